//! LLM fields from message bodies: `model` and `stream` from a request body; from a response
//! body (Ollama NDJSON, OpenAI SSE or one JSON document) the first and last content-bearing
//! chunk, the chunk count, Ollama's final counts and durations, OpenAI `usage`, the done or
//! finish reason, and mid-stream errors.
//!
//! Bodies arrive in pieces with gaps (partial capture), so nothing here needs a whole
//! document: the request body is read by a small incremental JSON scanner that follows the
//! top-level keys, and response lines are searched for the keys the engine needs (a key is a
//! quote not preceded by a backslash, so a key's name inside a string value never matches).
//! Lines are assembled in a bounded buffer only when split across writes. No body text leaves
//! this module except the model name and the done reason.

use super::exchange::LlmFields;
use super::http::BodyType;

/// Longest model name kept.
const MAX_MODEL: usize = 128;
/// Longest done/finish reason kept.
const MAX_REASON: usize = 32;
/// Longest error message read for what it names.
const MAX_MESSAGE: usize = 256;
/// Request body bytes scanned for `model` and `stream`.
const MAX_REQUEST_SCAN: u64 = 64 * 1024;
/// Longest response line assembled from pieces; longer lines are scanned piece by piece.
pub const MAX_LINE: usize = 4 * 1024;

/// What the request body says: `model` and `stream`.
#[derive(Debug, Default)]
pub struct RequestScan {
    pub model: Option<String>,
    pub stream: Option<bool>,
    json: JsonKeys,
    scanned: u64,
    /// A gap hid part of the body: the structure is unknown, keys are searched instead.
    lost: bool,
}

impl RequestScan {
    pub fn body(&mut self, bytes: &[u8]) {
        if self.done() {
            return;
        }
        self.scanned += bytes.len() as u64;
        if self.lost {
            self.search(bytes);
        } else {
            self.json.feed(bytes, &mut self.model, &mut self.stream);
        }
    }

    pub fn gap(&mut self) {
        self.lost = true;
    }

    fn done(&self) -> bool {
        (self.model.is_some() && self.stream.is_some()) || self.scanned > MAX_REQUEST_SCAN
    }

    fn search(&mut self, bytes: &[u8]) {
        for (key, value) in keys(bytes) {
            match key {
                b"model" if self.model.is_none() => self.model = string_value(value, MAX_MODEL),
                b"stream" if self.stream.is_none() => self.stream = bool_value(value),
                _ => {}
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Expect {
    #[default]
    Key,
    Colon,
    Value,
    /// After a value, until the comma.
    Comma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    None,
    Key,
    Model,
    Stream,
}

/// An incremental scanner of a JSON object's top-level keys: only `model` (a string) and
/// `stream` (a boolean) are kept. Bounded state: a few counters and two short buffers.
#[derive(Debug)]
struct JsonKeys {
    depth: u32,
    in_string: bool,
    escaped: bool,
    expect: Expect,
    capture: Capture,
    key: [u8; 8],
    key_len: usize,
    value: Vec<u8>,
}

impl Default for JsonKeys {
    fn default() -> Self {
        JsonKeys {
            depth: 0,
            in_string: false,
            escaped: false,
            expect: Expect::Key,
            capture: Capture::None,
            key: [0; 8],
            key_len: 0,
            value: Vec::new(),
        }
    }
}

impl JsonKeys {
    fn feed(&mut self, bytes: &[u8], model: &mut Option<String>, stream: &mut Option<bool>) {
        for &b in bytes {
            if self.in_string {
                self.string_byte(b, model);
                continue;
            }
            if self.capture == Capture::Stream {
                if b.is_ascii_alphabetic() {
                    self.push_value(b, 5);
                    continue;
                }
                *stream = bool_value(&self.value);
                self.capture = Capture::None;
                self.expect = Expect::Comma;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    if self.depth == 1 {
                        self.capture = match self.expect {
                            Expect::Key => Capture::Key,
                            Expect::Value if self.key() == b"model" => Capture::Model,
                            _ => Capture::None,
                        };
                        self.key_len = if self.capture == Capture::Key {
                            0
                        } else {
                            self.key_len
                        };
                        self.value.clear();
                    }
                }
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth == 2 {
                        self.expect = Expect::Comma;
                    }
                }
                b'}' | b']' => self.depth = self.depth.saturating_sub(1),
                b':' if self.depth == 1 && self.expect == Expect::Colon => {
                    self.expect = Expect::Value
                }
                b',' if self.depth == 1 => self.expect = Expect::Key,
                b't' | b'f' if self.depth == 1 && self.expect == Expect::Value => {
                    if self.key() == b"stream" {
                        self.capture = Capture::Stream;
                        self.value.clear();
                        self.push_value(b, 5);
                    } else {
                        self.expect = Expect::Comma;
                    }
                }
                b' ' | b'\t' | b'\r' | b'\n' => {}
                _ if self.depth == 1 && self.expect == Expect::Value => self.expect = Expect::Comma,
                _ => {}
            }
        }
    }

    fn string_byte(&mut self, b: u8, model: &mut Option<String>) {
        if self.escaped {
            self.escaped = false;
        } else if b == b'\\' {
            self.escaped = true;
            return;
        } else if b == b'"' {
            self.in_string = false;
            match self.capture {
                Capture::Key => self.expect = Expect::Colon,
                Capture::Model => {
                    *model = Some(String::from_utf8_lossy(&self.value).into_owned());
                    self.expect = Expect::Comma;
                }
                _ if self.depth == 1 => self.expect = Expect::Comma,
                _ => {}
            }
            self.capture = Capture::None;
            return;
        }
        match self.capture {
            Capture::Key => {
                if self.key_len < self.key.len() {
                    self.key[self.key_len] = b;
                }
                self.key_len += 1;
            }
            Capture::Model => self.push_value(b, MAX_MODEL),
            _ => {}
        }
    }

    fn key(&self) -> &[u8] {
        if self.key_len > self.key.len() {
            return b"";
        }
        &self.key[..self.key_len]
    }

    fn push_value(&mut self, b: u8, limit: usize) {
        if self.value.len() < limit {
            self.value.push(b);
        }
    }
}

/// Ollama's and OpenAI's endpoints that manage or list models rather than run one, and a
/// gateway's health checks and direct tool calls (OpenClaw's `/health`, `/healthz`, `/readyz`,
/// `/tools/invoke`): their exchanges are not model requests, whatever model the body names.
/// Matched at the end of the path (a gateway may serve Ollama's API under a prefix, as
/// `/ollama/api/show`); `/api/blobs/` and `/v1/models/` take an argument.
const NOT_MODEL_CALLS: [&str; 14] = [
    "/api/show",
    "/api/tags",
    "/api/ps",
    "/api/version",
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/v1/models",
    "/health",
    "/healthz",
    "/readyz",
    "/tools/invoke",
];
const NOT_MODEL_CALL_PREFIXES: [&str; 2] = ["/api/blobs/", "/v1/models/"];

/// Whether an exchange on `path` (query and fragment ignored) may run a model: every path but
/// the model-management and listing endpoints ([`NOT_MODEL_CALLS`]). Unknown paths stay model
/// calls, so that a gateway's own inference routes keep their model metrics.
pub fn is_model_call(path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    !NOT_MODEL_CALLS.iter().any(|call| path.ends_with(call))
        && !NOT_MODEL_CALL_PREFIXES
            .iter()
            .any(|prefix| path.contains(prefix))
}

/// The unescaped keys in `bytes` and what follows each one's colon.
pub(super) fn keys(bytes: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut quotes = memchr::memchr_iter(b'"', bytes);
    std::iter::from_fn(move || {
        loop {
            let open = quotes.next()?;
            if open > 0 && bytes[open - 1] == b'\\' {
                continue;
            }
            let rest = &bytes[open + 1..];
            // Keys of interest are short identifiers: look a little way for the closing quote.
            let Some(close) = rest.iter().take(24).position(|&b| b == b'"') else {
                continue;
            };
            let after = trim_start(&rest[close + 1..]);
            let Some(value) = after.strip_prefix(b":") else {
                continue;
            };
            // The closing quote is consumed so the next key search starts after it.
            quotes.next();
            return Some((&rest[..close], trim_start(value)));
        }
    })
}

pub(super) fn trim_start(bytes: &[u8]) -> &[u8] {
    let skip = bytes
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .count();
    &bytes[skip..]
}

pub(super) fn string_value(value: &[u8], limit: usize) -> Option<String> {
    let body = value.strip_prefix(b"\"")?;
    let mut out = Vec::new();
    let mut escaped = false;
    for &b in body {
        if escaped {
            escaped = false;
        } else if b == b'\\' {
            escaped = true;
            continue;
        } else if b == b'"' {
            return Some(String::from_utf8_lossy(&out).into_owned());
        }
        if out.len() < limit {
            out.push(b);
        }
    }
    // Cut before the closing quote: not known.
    None
}

pub(super) fn bool_value(value: &[u8]) -> Option<bool> {
    if value.starts_with(b"true") {
        Some(true)
    } else if value.starts_with(b"false") {
        Some(false)
    } else {
        None
    }
}

pub(super) fn number_value(value: &[u8]) -> Option<u64> {
    let digits = value.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits == value.len() {
        // No digits, or the number may continue past the captured bytes.
        return None;
    }
    std::str::from_utf8(&value[..digits]).ok()?.parse().ok()
}

/// A non-empty string value: model output.
fn has_text(value: &[u8]) -> bool {
    value.len() >= 2 && value[0] == b'"' && value[1] != b'"'
}

/// What one line (or piece of a long line) says.
#[derive(Debug, Default, Clone, Copy)]
struct LineFacts {
    /// Model output of the answer (or a tool call).
    answer: bool,
    /// Reasoning output: Ollama's `thinking`, OpenAI-style `reasoning`, Anthropic's
    /// `thinking_delta`, the Responses API's reasoning deltas.
    thinking: bool,
    error: bool,
    sse_done: bool,
}

/// The SSE event the current `data:` line belongs to, where it decides what a key means.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum SseEvent {
    /// No `event:` line (OpenAI chat completions, Ollama's native streams).
    #[default]
    Unnamed,
    /// `response.output_text.delta`: `delta` is answer text.
    OutputText,
    /// `response.reasoning_summary_text.delta`, `response.reasoning_text.delta`: `delta` is
    /// reasoning text.
    Reasoning,
    /// `response.output_item.added`: a new output item, a tool call when its type says so.
    ItemAdded,
    /// The Responses API's final events: their `status` says how the generation ended.
    Completed,
    Incomplete,
    /// Any other named event: its `delta` (a tool call's arguments) is not model text, and its
    /// items repeat those already counted.
    Other,
}

impl SseEvent {
    fn parse(name: &[u8]) -> SseEvent {
        match name {
            b"response.output_text.delta" => SseEvent::OutputText,
            b"response.reasoning_summary_text.delta" | b"response.reasoning_text.delta" => {
                SseEvent::Reasoning
            }
            b"response.output_item.added" => SseEvent::ItemAdded,
            b"response.completed" => SseEvent::Completed,
            b"response.incomplete" => SseEvent::Incomplete,
            // Anthropic names every event; its keys mean the same in each.
            b"message_start"
            | b"content_block_start"
            | b"content_block_delta"
            | b"content_block_stop"
            | b"message_delta"
            | b"message_stop"
            | b"ping" => SseEvent::Unnamed,
            _ => SseEvent::Other,
        }
    }
}

/// Which server error an error body names, where Ollama's text says (any API shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    /// `503`: "server busy, please try again.  maximum pending requests exceeded" (more requests
    /// waiting for a model than `OLLAMA_MAX_QUEUE`).
    ServerBusy,
    /// `400`: a prompt or input longer than the context that may not be truncated
    /// (`"truncate": false`): "the input length exceeds the context length", "input exceeds
    /// maximum context length …", "the prompt is longer than the context length …", and
    /// llama-server's "request (N tokens) exceeds the available context size (M tokens) …",
    /// which Ollama passes on (whole, as escaped JSON, in v0.32; its message in later ones).
    ContextExceeded,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::ServerBusy => "server_busy",
            Rejection::ContextExceeded => "context_exceeded",
        }
    }

    /// What a string `value` (an error's text) names; `None` for any other value.
    fn of_value(value: &[u8]) -> Option<Rejection> {
        let message = string_value(value, MAX_MESSAGE)?;
        let has = |needle: &str| message.contains(needle);
        if has("server busy") {
            Some(Rejection::ServerBusy)
        } else if has("context length") || has("context size") {
            Some(Rejection::ContextExceeded)
        } else {
            None
        }
    }
}

/// Counts tool calls from keys in order: a `function` object whose `name` comes before its
/// `arguments` (Ollama's native and OpenAI-style `tool_calls`; a streamed call's later pieces
/// carry arguments only), and items of type `tool_use` (Anthropic) or `function_call` (the
/// Responses API, where announced).
#[derive(Debug, Default)]
struct ToolCalls {
    in_function: bool,
}

/// Fields of one response body.
#[derive(Debug)]
pub struct ResponseScan {
    body_type: BodyType,
    line: Vec<u8>,
    facts: LineFacts,
    /// Timestamp of the first body byte, the first chunk of a non-streamed body.
    first_body: Option<u64>,
    first_chunk: Option<u64>,
    sse_done: bool,
    saw_data: bool,
    event: SseEvent,
    tools: ToolCalls,
    pub fields: LlmFields,
}

impl ResponseScan {
    pub fn new(body_type: BodyType) -> ResponseScan {
        ResponseScan {
            body_type,
            line: Vec::new(),
            facts: LineFacts::default(),
            first_body: None,
            first_chunk: None,
            sse_done: false,
            saw_data: false,
            event: SseEvent::default(),
            tools: ToolCalls::default(),
            fields: LlmFields::default(),
        }
    }

    pub fn is_stream(&self) -> bool {
        matches!(self.body_type, BodyType::Ndjson | BodyType::EventStream)
    }

    pub fn body(&mut self, mut bytes: &[u8], ts: u64) {
        if bytes.is_empty() {
            return;
        }
        self.first_body.get_or_insert(ts);
        self.saw_data = true;
        while let Some(nl) = memchr::memchr(b'\n', bytes) {
            let piece = &bytes[..nl];
            if self.line.is_empty() {
                self.scan_piece(piece, true);
            } else {
                let mut line = std::mem::take(&mut self.line);
                self.append(&mut line, piece);
                self.scan_piece(&line, true);
                line.clear();
                self.line = line;
            }
            self.end_line(ts);
            bytes = &bytes[nl + 1..];
        }
        if !bytes.is_empty() {
            let mut line = std::mem::take(&mut self.line);
            self.append(&mut line, bytes);
            self.line = line;
        }
    }

    /// Keeps `piece` for the current line; a line too long is scanned piece by piece.
    fn append(&mut self, line: &mut Vec<u8>, piece: &[u8]) {
        if line.len() + piece.len() > MAX_LINE {
            self.scan_piece(line, false);
            line.clear();
            if piece.len() > MAX_LINE {
                self.scan_piece(piece, false);
                return;
            }
        }
        line.extend_from_slice(piece);
    }

    /// Bytes not captured: the current line's pieces are read as they are.
    pub fn gap(&mut self) {
        let line = std::mem::take(&mut self.line);
        self.scan_piece(&line, false);
        self.line = line;
        self.line.clear();
    }

    fn scan_piece(&mut self, piece: &[u8], whole: bool) {
        let piece = piece.strip_suffix(b"\r").unwrap_or(piece);
        if whole && self.body_type == BodyType::EventStream {
            let data = piece.strip_prefix(b"data:").map(trim_start);
            if data == Some(b"[DONE]") {
                self.facts.sse_done = true;
                return;
            }
            // The Responses API and Anthropic's Messages API end a stream with a named event,
            // never `[DONE]`.
            if let Some(event) = piece.strip_prefix(b"event:").map(trim_start) {
                if matches!(event, b"response.completed" | b"message_stop") {
                    self.facts.sse_done = true;
                }
                self.event = SseEvent::parse(event);
                return;
            }
            if piece.is_empty() {
                // An event ends with an empty line.
                self.event = SseEvent::Unnamed;
                return;
            }
        }
        let event = self.event;
        let fields = &mut self.fields;
        for (key, value) in keys(piece) {
            match key {
                b"content" | b"response" | b"text" => self.facts.answer |= has_text(value),
                b"thinking" | b"reasoning" | b"reasoning_content" => {
                    self.facts.thinking |= has_text(value)
                }
                // The Responses API's text deltas; chat completions' `delta` is an object, whose
                // `content` counts instead.
                b"delta" => match event {
                    SseEvent::Reasoning => self.facts.thinking |= has_text(value),
                    SseEvent::Unnamed | SseEvent::OutputText => {
                        self.facts.answer |= has_text(value)
                    }
                    _ => {}
                },
                // The Responses API carries `"error": null` in its lifecycle events.
                b"error" => {
                    self.facts.error |= !value.starts_with(b"null");
                    fields.rejection = Rejection::of_value(value).or(fields.rejection);
                }
                // OpenAI's and Anthropic's error objects: `{"error":{"message":…}}`.
                b"message" => {
                    fields.rejection = fields.rejection.or_else(|| Rejection::of_value(value))
                }
                b"done_reason" | b"finish_reason" | b"stop_reason" => {
                    if let Some(reason) = string_value(value, MAX_REASON) {
                        fields.done_reason = Some(reason);
                    }
                }
                b"status" if matches!(event, SseEvent::Completed | SseEvent::Incomplete) => {
                    match string_value(value, MAX_REASON).as_deref() {
                        Some("completed") => fields.done_reason = Some("stop".into()),
                        Some("incomplete") => fields.done_reason = Some("length".into()),
                        _ => {}
                    }
                }
                b"function" => self.tools.in_function = value.starts_with(b"{"),
                b"name" if self.tools.in_function => {
                    self.tools.in_function = false;
                    fields.tool_calls += 1;
                    self.facts.answer = true;
                }
                b"arguments" => self.tools.in_function = false,
                b"type" => {
                    let tool = match string_value(value, MAX_REASON).as_deref() {
                        Some("tool_use") => true,
                        Some("function_call") => !matches!(
                            event,
                            SseEvent::Other | SseEvent::Completed | SseEvent::Incomplete
                        ),
                        _ => false,
                    };
                    if tool {
                        fields.tool_calls += 1;
                        self.facts.answer = true;
                    }
                }
                // Ollama's, OpenAI chat completions', and the Responses API's and Anthropic's.
                b"prompt_eval_count" | b"prompt_tokens" | b"input_tokens" => {
                    set(&mut fields.prompt_tokens, number_value(value))
                }
                b"eval_count" | b"completion_tokens" | b"output_tokens" => {
                    set(&mut fields.completion_tokens, number_value(value))
                }
                b"prompt_eval_duration" => {
                    set(&mut fields.prompt_eval_duration_ns, number_value(value))
                }
                b"eval_duration" => set(&mut fields.eval_duration_ns, number_value(value)),
                b"load_duration" => set(&mut fields.load_duration_ns, number_value(value)),
                b"total_duration" => set(&mut fields.total_duration_ns, number_value(value)),
                _ => {}
            }
        }
    }

    fn end_line(&mut self, ts: u64) {
        let facts = std::mem::take(&mut self.facts);
        if (facts.answer || facts.thinking) && self.is_stream() {
            self.fields.chunks += 1;
            self.first_chunk.get_or_insert(ts);
            self.fields.last_chunk_ns = Some(ts);
            if facts.thinking {
                self.fields.thinking_chunks += 1;
            }
            if facts.answer {
                self.fields.first_answer_ns.get_or_insert(ts);
            }
        }
        self.fields.error |= facts.error;
        self.sse_done |= facts.sse_done;
    }

    /// The body is over (`complete`: framed to its end). Returns the fields and the first
    /// chunk's timestamp.
    pub fn finish(mut self, ts: u64, complete: bool) -> (LlmFields, Option<u64>) {
        let facts = self.facts;
        if !self.line.is_empty() || facts.answer || facts.thinking || facts.error {
            let line = std::mem::take(&mut self.line);
            self.scan_piece(&line, true);
            self.end_line(ts);
        }
        if self.body_type == BodyType::EventStream && complete && self.saw_data && !self.sse_done {
            // Ollama's OpenAI layer ends a stream that failed without `[DONE]`.
            self.fields.error = true;
        }
        if self.fields.error {
            self.fields.done_reason = Some("error".to_string());
        }
        let first_chunk = if self.is_stream() {
            self.first_chunk
        } else {
            self.first_body
        };
        if !self.is_stream() && first_chunk.is_some() {
            self.fields.chunks = 1;
            self.fields.last_chunk_ns = first_chunk;
        }
        if self.is_stream() && self.fields.completion_tokens.is_none() && self.fields.chunks > 0 {
            // Nothing reported (an OpenAI-style stream without `include_usage`, a stream cut
            // short): one token per streamed chunk, as Ollama streams them.
            self.fields.estimated_completion_tokens = Some(self.fields.chunks);
        }
        (self.fields, first_chunk)
    }
}

fn set(slot: &mut Option<u64>, value: Option<u64>) {
    if value.is_some() {
        *slot = value;
    }
}

#[cfg(test)]
mod tests;
