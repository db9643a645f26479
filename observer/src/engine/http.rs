//! Incremental HTTP/1.x message framing for one direction of one connection.
//!
//! A [`MessageParser`] is fed the bytes of that direction in order, with the gaps that partial
//! capture leaves (a syscall's head and tail are known, its middle only by length). It finds
//! message heads with `httparse`, frames bodies (Content-Length, chunked, close-delimited),
//! and reports to a [`Sink`]: head, body bytes, body gaps, end. It never allocates per byte:
//! a head is parsed in place when it arrives whole and buffered (bounded) only when split.
//!
//! When framing is lost (a gap hides a chunk header, a head is cut) it falls back to
//! `Unframed`: the body runs until something outside says the message is over (the next
//! message, the connection's close, a chunked terminator at the end of a write). Bytes that
//! are not HTTP put it in `Resync`, which looks for the next message start at the beginning of
//! each write and after each line feed. Each fallback is reported once, by reason.

use super::ErrorReason;
use super::exchange::Method;

/// Longest message head buffered while it arrives in pieces.
pub const MAX_HEAD: usize = 8 * 1024;
/// Headers parsed per message; more is `head_too_large`.
const MAX_HEADERS: usize = 96;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Response,
}

/// How a response body is to be read, as its request decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyRule {
    /// From the head's own framing headers.
    Framed,
    /// No body whatever the headers say (HEAD, 1xx, 204, 304).
    None,
    /// Nothing after this head can be parsed as HTTP (101, CONNECT tunnels).
    Opaque,
}

/// What the body of a message is, from its Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    Ndjson,
    EventStream,
    Json,
    Other,
}

/// What the engine needs of a message head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: Method,
    /// Request target without the query string, bounded.
    pub path: String,
    pub status: u16,
    pub content_length: Option<u64>,
    pub chunked: bool,
    pub expect_continue: bool,
    pub body_type: BodyType,
    /// `Upgrade: websocket`.
    pub websocket: bool,
    /// `Sec-WebSocket-Extensions` names `permessage-deflate` (in a `101`: it was negotiated).
    pub deflate: bool,
    /// The trace id of a W3C `traceparent` header.
    pub trace_id: Option<u128>,
    /// False when the head was cut by a capture gap and only its first lines were read.
    pub complete: bool,
}

impl Head {
    /// A head's start line; the headers fill in the rest.
    fn start(method: Method, path: String, status: u16, complete: bool) -> Head {
        Head {
            method,
            path,
            status,
            content_length: None,
            chunked: false,
            expect_continue: false,
            body_type: BodyType::Other,
            websocket: false,
            deflate: false,
            trace_id: None,
            complete,
        }
    }
}

/// Receives what the parser finds. `ts` is the timestamp of the write or read the bytes
/// came in.
pub trait Sink {
    fn head(&mut self, head: &Head, ts: u64) -> BodyRule;
    fn body(&mut self, bytes: &[u8], ts: u64);
    /// `n` body bytes that were not captured.
    fn body_gap(&mut self, n: u64);
    fn end(&mut self, ts: u64);
    fn error(&mut self, reason: ErrorReason);
    /// Bytes after an upgrade (`101`), captured: they belong to the new protocol.
    fn upgraded(&mut self, _bytes: &[u8], _ts: u64) {}
    /// `n` bytes after an upgrade that were not captured.
    fn upgraded_gap(&mut self, _n: u64) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex size; `digits` counts them.
    Size {
        size: u64,
        digits: u8,
    },
    /// After the size: extensions up to the line feed.
    SizeLine {
        size: u64,
    },
    Data(u64),
    /// The CRLF after chunk data.
    DataEnd {
        cr: bool,
    },
    /// Trailer lines after the last chunk; `blank` while the current line is still empty.
    Trailer {
        blank: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between messages: the next byte starts a head.
    Idle,
    /// A head is arriving in pieces (in `buf`).
    Head,
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    /// Framing lost: body until the next message start, close, or a chunked terminator.
    Unframed,
    /// Not at a message boundary: looking for one.
    Resync,
    /// After an upgrade: nothing here is HTTP any more.
    Opaque,
}

/// Frames the messages of one direction of a connection.
#[derive(Debug)]
pub struct MessageParser {
    kind: Kind,
    state: State,
    buf: Vec<u8>,
    /// Timestamp of the first byte of the head in `buf`.
    head_ts: u64,
    /// Timestamp of the last bytes delivered in the current message.
    last_ts: u64,
    /// The last bytes seen, to recognise a chunked terminator while unframed.
    recent: [u8; 5],
    unframed_chunked: bool,
    /// Reported once bytes are actually skipped (a connection first seen mid-stream).
    resync_reason: Option<ErrorReason>,
}

impl MessageParser {
    pub fn new(kind: Kind) -> MessageParser {
        MessageParser {
            kind,
            state: State::Idle,
            buf: Vec::new(),
            head_ts: 0,
            last_ts: 0,
            recent: [0; 5],
            unframed_chunked: false,
            resync_reason: None,
        }
    }

    /// A parser for a connection first seen mid-stream: it starts by looking for a message.
    pub fn resyncing(kind: Kind) -> MessageParser {
        MessageParser {
            state: State::Resync,
            resync_reason: Some(ErrorReason::MidStream),
            ..MessageParser::new(kind)
        }
    }

    /// Whether a message is in progress (head or body).
    pub fn in_message(&self) -> bool {
        !matches!(self.state, State::Idle | State::Resync | State::Opaque)
    }

    /// One write or read: `len` bytes moved, of which the first `head.len()` and the last
    /// `tail.len()` were captured.
    pub fn segment(&mut self, ts: u64, len: u64, head: &[u8], tail: &[u8], sink: &mut impl Sink) {
        let captured = (head.len() + tail.len()) as u64;
        if self.state == State::Unframed && self.starts_message(head) {
            self.end_message(sink);
        }
        self.feed(ts, head, true, sink);
        if len > captured {
            self.skip(ts, len - captured, sink);
            self.feed(ts, tail, true, sink);
        } else {
            self.feed(ts, tail, false, sink);
        }
        if self.state == State::Unframed && self.unframed_chunked && &self.recent == b"0\r\n\r\n" {
            self.end_message(sink);
        }
    }

    /// The other side answered while this head was still arriving: it will not be finished,
    /// so what arrived of it is taken as a cut head (a 408 or 400 to a slow or broken request
    /// still counts as an exchange). Returns whether there was such a head.
    pub fn end_partial_head(&mut self, sink: &mut impl Sink) -> bool {
        if self.state != State::Head {
            return false;
        }
        self.cut_head(sink);
        true
    }

    /// Nothing after this can be parsed (the connection was upgraded).
    pub fn set_opaque(&mut self) {
        self.buf = Vec::new();
        self.state = State::Opaque;
    }

    /// Ends an unframed message from outside (the other direction saw the next exchange
    /// begin). Returns whether one was ended.
    pub fn end_unframed(&mut self, sink: &mut impl Sink) -> bool {
        if self.state != State::Unframed {
            return false;
        }
        self.end_message(sink);
        true
    }

    /// The connection closed: a close-delimited or unframed body ends here; any other message
    /// in progress is cut short (reported by the owner, who knows what was pending).
    pub fn close(&mut self, sink: &mut impl Sink) {
        if matches!(self.state, State::UntilClose | State::Unframed) {
            self.end_message(sink);
        }
        self.buf = Vec::new();
        self.state = State::Opaque;
    }

    fn end_message(&mut self, sink: &mut impl Sink) {
        self.state = State::Idle;
        self.unframed_chunked = false;
        self.recent = [0; 5];
        sink.end(self.last_ts);
    }

    fn starts_message(&self, bytes: &[u8]) -> bool {
        looks_like_start(self.kind, bytes)
    }

    fn skip(&mut self, ts: u64, n: u64, sink: &mut impl Sink) {
        if self.in_message() {
            self.last_ts = ts;
        }
        match self.state {
            State::Idle => {
                sink.error(ErrorReason::TruncatedHead);
                self.state = State::Resync;
            }
            State::Head => {
                self.cut_head(sink);
                if self.state == State::Opaque {
                    // An upgrade whose head was cut: the rest of the gap is the new protocol's
                    // (its parser loses framing there, never reads the middle as a start).
                    sink.upgraded_gap(n);
                }
            }
            State::Length(remaining) => {
                if n < remaining {
                    self.state = State::Length(remaining - n);
                    sink.body_gap(n);
                } else {
                    // The next message began inside the gap: its head is lost.
                    sink.body_gap(remaining);
                    self.end_message(sink);
                    if n > remaining {
                        sink.error(ErrorReason::TruncatedHead);
                        self.state = State::Resync;
                    }
                }
            }
            State::Chunked(Chunk::Data(remaining)) if n <= remaining => {
                self.state = State::Chunked(Chunk::Data(remaining - n));
                sink.body_gap(n);
            }
            State::Chunked(_) => {
                sink.error(ErrorReason::FramingFallback);
                sink.body_gap(n);
                self.unframe(true);
            }
            State::UntilClose | State::Unframed => sink.body_gap(n),
            State::Opaque => sink.upgraded_gap(n),
            State::Resync => {}
        }
        self.recent = [0; 5];
    }

    fn unframe(&mut self, chunked: bool) {
        self.state = State::Unframed;
        self.unframed_chunked = chunked;
    }

    /// Feeds captured bytes. `boundary`: the bytes begin a write (a place a message may start
    /// while resynchronising).
    fn feed(&mut self, ts: u64, mut bytes: &[u8], boundary: bool, sink: &mut impl Sink) {
        let mut at_boundary = boundary;
        if !bytes.is_empty() {
            remember_recent(&mut self.recent, bytes);
        }
        while !bytes.is_empty() {
            let used = match self.state {
                State::Idle => {
                    self.head_ts = ts;
                    self.state = State::Head;
                    0
                }
                State::Head => self.feed_head(bytes, sink),
                State::Length(remaining) => {
                    let n = remaining.min(bytes.len() as u64) as usize;
                    self.last_ts = ts;
                    sink.body(&bytes[..n], ts);
                    if n as u64 == remaining {
                        self.end_message(sink);
                    } else {
                        self.state = State::Length(remaining - n as u64);
                    }
                    n
                }
                State::Chunked(chunk) => self.feed_chunked(chunk, ts, bytes, sink),
                State::UntilClose | State::Unframed => {
                    self.last_ts = ts;
                    sink.body(bytes, ts);
                    bytes.len()
                }
                State::Resync => {
                    let from = if at_boundary { 0 } else { 1 };
                    let found = self.find_start(bytes, from);
                    let reason = self.resync_reason.take();
                    if found != Some(0)
                        && let Some(reason) = reason
                    {
                        sink.error(reason);
                    }
                    match found {
                        Some(at) => {
                            self.state = State::Idle;
                            at
                        }
                        None => bytes.len(),
                    }
                }
                State::Opaque => {
                    sink.upgraded(bytes, ts);
                    bytes.len()
                }
            };
            at_boundary = false;
            bytes = &bytes[used..];
        }
    }

    /// Where in `bytes` (at `from` or after a line feed) a message starts.
    fn find_start(&self, bytes: &[u8], from: usize) -> Option<usize> {
        if from == 0 && looks_like_start(self.kind, bytes) {
            return Some(0);
        }
        memchr::memchr_iter(b'\n', bytes)
            .map(|at| at + 1)
            .find(|&at| looks_like_start(self.kind, &bytes[at..]))
    }

    fn feed_head(&mut self, bytes: &[u8], sink: &mut impl Sink) -> usize {
        if self.buf.is_empty() {
            // The common case: the whole head is in this write; parse it in place.
            match parse_head(self.kind, bytes) {
                Parsed::Complete(head, len) => {
                    self.start_body(head, sink);
                    return len;
                }
                Parsed::Partial => {}
                Parsed::Invalid(reason) => return self.reject_head(reason, sink),
            }
            return self.buffer_head(bytes, sink);
        }
        let before = self.buf.len();
        let taken = bytes.len().min(MAX_HEAD + 1 - before);
        self.buf.extend_from_slice(&bytes[..taken]);
        let parsed = parse_head(self.kind, &self.buf);
        let too_large = self.buf.len() > MAX_HEAD;
        if !matches!(parsed, Parsed::Partial) || too_large {
            self.buf.clear();
        }
        match parsed {
            Parsed::Complete(head, len) => {
                self.start_body(head, sink);
                len - before
            }
            Parsed::Partial if too_large => {
                self.reject_head(ErrorReason::HeadTooLarge, sink);
                // Skip the rest of this write; resync at the next one.
                bytes.len()
            }
            Parsed::Partial => taken,
            Parsed::Invalid(reason) => {
                self.reject_head(reason, sink);
                // Start looking again just after the first buffered byte.
                0
            }
        }
    }

    fn buffer_head(&mut self, bytes: &[u8], sink: &mut impl Sink) -> usize {
        if bytes.len() > MAX_HEAD {
            self.reject_head(ErrorReason::HeadTooLarge, sink);
            return bytes.len();
        }
        self.buf.extend_from_slice(bytes);
        bytes.len()
    }

    /// Not a head here: count it once and look for the next message start.
    fn reject_head(&mut self, reason: ErrorReason, sink: &mut impl Sink) -> usize {
        sink.error(reason);
        self.state = State::Resync;
        // The first byte cannot start a message: resync looks from the next line.
        1
    }

    /// A gap inside a head: read what its first lines say, then fall back.
    fn cut_head(&mut self, sink: &mut impl Sink) {
        let head = parse_cut_head(self.kind, &self.buf);
        self.buf.clear();
        sink.error(ErrorReason::TruncatedHead);
        let Some(head) = head else {
            self.state = State::Resync;
            return;
        };
        self.last_ts = self.head_ts;
        match sink.head(&head, self.head_ts) {
            BodyRule::Opaque => self.state = State::Opaque,
            BodyRule::None => {
                // The rest of the head is in the gap; nothing follows it.
                self.end_message(sink);
                self.state = State::Resync;
            }
            BodyRule::Framed => self.unframe(head.chunked),
        }
    }

    fn start_body(&mut self, head: Head, sink: &mut impl Sink) {
        let ts = self.head_ts;
        self.last_ts = ts;
        let rule = sink.head(&head, ts);
        self.state = match rule {
            BodyRule::Opaque => State::Opaque,
            BodyRule::None => State::Length(0),
            BodyRule::Framed if head.chunked => State::Chunked(Chunk::Size { size: 0, digits: 0 }),
            BodyRule::Framed => match (head.content_length, self.kind) {
                (Some(n), _) => State::Length(n),
                (None, Kind::Request) => State::Length(0),
                (None, Kind::Response) => State::UntilClose,
            },
        };
        if self.state == State::Length(0) {
            self.end_message(sink);
        }
    }

    fn feed_chunked(&mut self, chunk: Chunk, ts: u64, bytes: &[u8], sink: &mut impl Sink) -> usize {
        self.last_ts = ts;
        let (next, used) = match chunk {
            Chunk::Data(remaining) => {
                let n = remaining.min(bytes.len() as u64) as usize;
                sink.body(&bytes[..n], ts);
                let next = if n as u64 == remaining {
                    Chunk::DataEnd { cr: false }
                } else {
                    Chunk::Data(remaining - n as u64)
                };
                (next, n)
            }
            Chunk::Size { size, digits } => {
                let b = bytes[0];
                let next = match hex_value(b) {
                    Some(v) if digits < 16 => Chunk::Size {
                        size: size << 4 | u64::from(v),
                        digits: digits + 1,
                    },
                    _ if digits > 0 && matches!(b, b';' | b' ' | b'\t' | b'\r') => {
                        Chunk::SizeLine { size }
                    }
                    _ if digits > 0 && b == b'\n' => return self.chunk_size_done(size),
                    _ => return self.bad_chunk(sink),
                };
                (next, 1)
            }
            Chunk::SizeLine { size } => match memchr::memchr(b'\n', bytes) {
                Some(at) => {
                    let used = self.chunk_size_done(size);
                    return at + used;
                }
                None => (chunk, bytes.len()),
            },
            Chunk::DataEnd { cr } => match bytes[0] {
                b'\r' if !cr => (Chunk::DataEnd { cr: true }, 1),
                b'\n' => (Chunk::Size { size: 0, digits: 0 }, 1),
                _ => return self.bad_chunk(sink),
            },
            Chunk::Trailer { blank } => match bytes[0] {
                b'\n' if blank => {
                    self.end_message(sink);
                    return 1;
                }
                b'\n' => (Chunk::Trailer { blank: true }, 1),
                b'\r' => (chunk, 1),
                _ => (Chunk::Trailer { blank: false }, 1),
            },
        };
        self.state = State::Chunked(next);
        used
    }

    /// The size line is read (its line feed is the byte at hand).
    fn chunk_size_done(&mut self, size: u64) -> usize {
        self.state = State::Chunked(if size == 0 {
            Chunk::Trailer { blank: true }
        } else {
            Chunk::Data(size)
        });
        1
    }

    fn bad_chunk(&mut self, sink: &mut impl Sink) -> usize {
        sink.error(ErrorReason::BadChunk);
        // The message's end is unknown now; it ends at the next message or close.
        self.unframe(true);
        0
    }
}

fn remember_recent(recent: &mut [u8; 5], bytes: &[u8]) {
    if bytes.len() >= 5 {
        recent.copy_from_slice(&bytes[bytes.len() - 5..]);
    } else {
        recent.rotate_left(bytes.len());
        recent[5 - bytes.len()..].copy_from_slice(bytes);
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether `bytes` plausibly begin a message of this kind: a known method and a space, or
/// `HTTP/1.`. Used to resynchronise, so it must reject body bytes cheaply.
pub fn looks_like_start(kind: Kind, bytes: &[u8]) -> bool {
    match kind {
        Kind::Response => bytes.starts_with(b"HTTP/1."),
        Kind::Request => {
            let Some(space) = bytes.iter().take(8).position(|&b| b == b' ') else {
                return false;
            };
            let method = std::str::from_utf8(&bytes[..space]).unwrap_or("");
            Method::parse(method) != Method::Other && bytes.get(space + 1).is_some()
        }
    }
}

enum Parsed {
    Complete(Head, usize),
    Partial,
    Invalid(ErrorReason),
}

fn parse_head(kind: Kind, bytes: &[u8]) -> Parsed {
    // Left uninitialised: the parser writes the ones it fills (no 3 KiB of stores per head).
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let parsed = match kind {
        Kind::Request => {
            let mut req = httparse::Request::new(&mut []);
            match req.parse_with_uninit_headers(bytes, &mut headers) {
                Ok(httparse::Status::Complete(len)) => {
                    let method = Method::parse(req.method.unwrap_or(""));
                    let path = bounded_path(req.path.unwrap_or(""));
                    Ok((method, path, 0, len, req.headers))
                }
                Ok(httparse::Status::Partial) => return Parsed::Partial,
                Err(err) => Err(err),
            }
        }
        Kind::Response => {
            let mut resp = httparse::Response::new(&mut []);
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut resp,
                bytes,
                &mut headers,
            ) {
                Ok(httparse::Status::Complete(len)) => Ok((
                    Method::Other,
                    String::new(),
                    resp.code.unwrap_or(0),
                    len,
                    resp.headers,
                )),
                Ok(httparse::Status::Partial) => return Parsed::Partial,
                Err(err) => Err(err),
            }
        }
    };
    match parsed {
        Ok((method, path, status, len, headers)) => {
            let mut head = Head::start(method, path, status, true);
            for header in headers.iter() {
                if apply_header(&mut head, header.name, header.value).is_err() {
                    return Parsed::Invalid(ErrorReason::BadHead);
                }
            }
            Parsed::Complete(head, len)
        }
        Err(httparse::Error::TooManyHeaders) => Parsed::Invalid(ErrorReason::HeadTooLarge),
        Err(_) => Parsed::Invalid(ErrorReason::BadHead),
    }
}

/// Reads the framing headers the engine uses; the values of others are not looked at (they
/// may hold any bytes, `obs-text` included). Conflicting lengths, or a framing header that is
/// not text, are an invalid head (a request-smuggling shape no honest server sends).
fn apply_header(head: &mut Head, name: &str, value: &[u8]) -> Result<(), ()> {
    let text = || std::str::from_utf8(value).map(str::trim).map_err(|_| ());
    if name.eq_ignore_ascii_case("content-length") {
        let n: u64 = text()?.parse().map_err(|_| ())?;
        if head.content_length.is_some_and(|m| m != n) {
            return Err(());
        }
        head.content_length = Some(n);
    } else if name.eq_ignore_ascii_case("transfer-encoding") {
        let last = text()?.rsplit(',').next().unwrap_or("").trim();
        head.chunked = last.eq_ignore_ascii_case("chunked");
    } else if name.eq_ignore_ascii_case("expect") {
        head.expect_continue = text()?.eq_ignore_ascii_case("100-continue");
    } else if name.eq_ignore_ascii_case("content-type") {
        head.body_type = body_type(text()?);
    } else if name.eq_ignore_ascii_case("upgrade") {
        head.websocket |= contains_token(value, b"websocket");
    } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
        head.deflate |= contains_token(value, b"permessage-deflate");
    } else if name.eq_ignore_ascii_case("traceparent") {
        head.trace_id = trace_id(value);
    }
    Ok(())
}

/// The trace id of a W3C `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`); `None` for any
/// other form or the invalid all-zero id.
pub fn trace_id(value: &[u8]) -> Option<u128> {
    let value = value.trim_ascii();
    let mut parts = value.split(|&b| b == b'-');
    let (version, id, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || id.len() != 32 || parent.len() != 16 || flags.len() != 2 {
        return None;
    }
    let id = u128::from_str_radix(std::str::from_utf8(id).ok()?, 16).ok()?;
    (id != 0).then_some(id)
}

/// Whether a comma-separated header value holds `token` (ASCII case-insensitive, parameters
/// after `;` ignored).
fn contains_token(value: &[u8], token: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|item| {
        let name = item.split(|&b| b == b';').next().unwrap_or(item);
        name.trim_ascii().eq_ignore_ascii_case(token)
    })
}

fn body_type(content_type: &str) -> BodyType {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/x-ndjson")
        || essence.eq_ignore_ascii_case("application/ndjson")
        || essence.eq_ignore_ascii_case("application/jsonl")
    {
        BodyType::Ndjson
    } else if essence.eq_ignore_ascii_case("text/event-stream") {
        BodyType::EventStream
    } else if essence.eq_ignore_ascii_case("application/json") {
        BodyType::Json
    } else {
        BodyType::Other
    }
}

/// A head whose end was not captured: its start line and the header lines that arrived whole.
fn parse_cut_head(kind: Kind, bytes: &[u8]) -> Option<Head> {
    let mut lines = bytes.split(|&b| b == b'\n');
    let first = std::str::from_utf8(lines.next()?)
        .ok()?
        .trim_end_matches('\r');
    let mut parts = first.split(' ');
    let (method, path, status) = match kind {
        Kind::Request => {
            let method = Method::parse(parts.next()?);
            let path = parts.next()?;
            parts.next()?.strip_prefix("HTTP/1.")?;
            (method, bounded_path(path), 0)
        }
        Kind::Response => {
            parts.next()?.strip_prefix("HTTP/1.")?;
            let status: u16 = parts.next()?.parse().ok()?;
            (Method::Other, String::new(), status)
        }
    };
    // The first line must have been whole: a line feed follows it.
    bytes.iter().position(|&b| b == b'\n')?;
    let mut head = Head::start(method, path, status, false);
    let whole: Vec<&[u8]> = lines.collect();
    // The last piece was cut by the gap (or is empty): only lines before it are whole.
    for line in whole.iter().take(whole.len().saturating_sub(1)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(colon) = line.iter().position(|&b| b == b':')
            && let Ok(name) = std::str::from_utf8(&line[..colon])
        {
            let _ = apply_header(&mut head, name, &line[colon + 1..]);
        }
    }
    Some(head)
}

/// The path of a request target, without query or fragment, at most `MAX_PATH` bytes.
fn bounded_path(target: &str) -> String {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let mut end = path.len().min(super::MAX_PATH);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    path[..end].to_string()
}

#[cfg(test)]
mod tests;
