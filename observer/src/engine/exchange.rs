//! What the engine produces: one [`Exchange`] per HTTP request/response pair, with the timestamps
//! of docs/DESIGN.md#engine-timestamps and the LLM fields read from the bodies. Plain data: no
//! parsing here, and nothing that knows about metrics or where the bytes came from.

use crate::base::{ConnRecord, Role, Side};

/// The connection an exchange was seen on: which port and role, which end of it the observed
/// process is, and the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ConnMeta {
    pub conn_id: u64,
    pub role: Role,
    pub side: Side,
    pub port: u16,
    pub tgid: u32,
}

impl From<&ConnRecord> for ConnMeta {
    fn from(c: &ConnRecord) -> ConnMeta {
        ConnMeta {
            conn_id: c.conn_id,
            role: c.role,
            side: c.side,
            port: c.port,
            tgid: c.tgid,
        }
    }
}

/// A request method; anything else is `Other` (bounded label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Patch,
    Connect,
    Trace,
    Other,
}

impl Method {
    pub fn parse(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            "PATCH" => Method::Patch,
            "CONNECT" => Method::Connect,
            "TRACE" => Method::Trace,
            _ => Method::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
            Method::Patch => "PATCH",
            Method::Connect => "CONNECT",
            Method::Trace => "TRACE",
            Method::Other => "other",
        }
    }
}

impl serde::Serialize for Method {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// How an exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The response was framed to its last byte (Content-Length, chunked terminator, or the
    /// close that delimits it).
    Complete,
    /// The connection closed before the response was complete (or before it began).
    Aborted,
    /// The connection was forgotten with the exchange still open (engine limits, shutdown).
    Evicted,
}

/// Kernel monotonic timestamps of an exchange, in ns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Timestamps {
    pub request_first: u64,
    pub request_last: u64,
    /// The final (non-1xx) response's status line.
    pub response_first: Option<u64>,
    /// The first body bytes carrying model output (docs/DESIGN.md#engine-time-to-first-token).
    pub first_chunk: Option<u64>,
    pub response_last: Option<u64>,
}

impl Timestamps {
    /// Response last byte − request first byte.
    pub fn duration_ns(&self) -> Option<u64> {
        Some(self.response_last?.saturating_sub(self.request_first))
    }

    /// Response first byte − request last byte.
    pub fn time_to_first_byte_ns(&self) -> Option<u64> {
        Some(self.response_first?.saturating_sub(self.request_last))
    }

    /// First content chunk − request last byte.
    pub fn time_to_first_chunk_ns(&self) -> Option<u64> {
        Some(self.first_chunk?.saturating_sub(self.request_last))
    }
}

/// What the model server said about the generation, read from request and response bodies. Counts
/// and durations are `None` where the body did not carry them (docs/DESIGN.md#engine-llm-fields:
/// missing fields are not observed).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LlmFields {
    /// `model` of the request body.
    pub model: Option<String>,
    /// `stream` of the request body, or the route's default when absent.
    pub stream: Option<bool>,
    /// Ollama's `done_reason` or OpenAI's `finish_reason`; `error` for a mid-stream error.
    pub done_reason: Option<String>,
    /// Ollama `prompt_eval_count` / OpenAI `usage.prompt_tokens`.
    pub prompt_tokens: Option<u64>,
    /// Ollama `eval_count` / OpenAI `usage.completion_tokens`.
    pub completion_tokens: Option<u64>,
    /// Ollama's `eval_duration`, `prompt_eval_duration`, `load_duration` and `total_duration`,
    /// in nanoseconds.
    pub eval_duration_ns: Option<u64>,
    pub prompt_eval_duration_ns: Option<u64>,
    pub load_duration_ns: Option<u64>,
    pub total_duration_ns: Option<u64>,
    /// Body lines/events that carried model output (answer, reasoning or a tool call).
    pub chunks: u64,
    /// Those that carried reasoning (`thinking`).
    pub thinking_chunks: u64,
    /// Timestamp of the last of those.
    pub last_chunk_ns: Option<u64>,
    /// Timestamp of the first streamed chunk carrying the answer (or a tool call), after any
    /// reasoning.
    pub first_answer_ns: Option<u64>,
    /// Tool calls the response made.
    pub tool_calls: u64,
    /// Completion tokens counted from a stream's chunks where the server reported none.
    pub estimated_completion_tokens: Option<u64>,
    /// The server error an error body names (server busy, context exceeded).
    pub rejection: Option<super::llm::Rejection>,
    /// An `{"error": ...}` line (or an SSE stream that ended without `[DONE]`).
    pub error: bool,
}

impl LlmFields {
    /// docs/DESIGN.md#engine-llm-fields: (last chunk − first chunk) / (chunks − 1).
    pub fn inter_chunk_ns(&self, first_chunk: Option<u64>) -> Option<u64> {
        if self.chunks < 2 {
            return None;
        }
        let span = self.last_chunk_ns?.checked_sub(first_chunk?)?;
        Some(span / (self.chunks - 1))
    }
}

/// One HTTP request and its response.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Exchange {
    pub conn: ConnMeta,
    pub method: Method,
    /// Request target without its query string (at most [`MAX_PATH`] bytes).
    pub path: String,
    /// Final status; `None` when no response head was seen.
    pub status: Option<u16>,
    pub ts: Timestamps,
    /// Body bytes (after de-chunking) as counted by framing, including bytes not captured.
    pub request_body_bytes: u64,
    pub response_body_bytes: u64,
    pub outcome: Outcome,
    /// False when framing had to fall back (partial capture hid a length or terminator).
    pub exact: bool,
    pub llm: LlmFields,
    /// The trace id of the request's `traceparent` header.
    pub trace_id: Option<u128>,
}

/// Longest request path kept in an exchange.
pub const MAX_PATH: usize = 256;
