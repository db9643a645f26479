//! One HTTP/1 response read as its bytes arrive, with no I/O of its own: the head (read with
//! `httparse`; interim 1xx responses skipped), the body's framing (`Content-Length`, chunked
//! coding with extensions and trailers, or until the connection closes; none after a HEAD, a
//! 204 or a 304), and, for a stream, its lines (Ollama's NDJSON, OpenAI's server-sent events).
//! It notes when each milestone arrived: the first byte, the first body byte, the first line
//! carrying model output, the last byte. The time type is generic so that the tests can feed
//! read numbers instead of instants. On request ([`Response::keeping_body`]) it keeps the
//! final head, the body and each whole chunk, for the tests that check them byte for byte.

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Longest head or chunk-size line accepted: a guard against reading garbage forever.
const MAX_LINE: usize = 64 * 1024;
/// The most headers a head may have.
const MAX_HEADERS: usize = 64;

/// What the body is, from `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/x-ndjson`: Ollama's stream, one JSON document a line.
    Ndjson,
    /// `text/event-stream`: OpenAI's stream, `data: {json}` events, `data: [DONE]` last.
    EventStream,
    /// Anything else: one document, its first byte is its first chunk.
    Whole,
}

/// How the body's end is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length`: this many bytes (left, while reading).
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the server closes the connection.
    UntilClose,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Head,
    Body,
    Done,
}

/// A response being read, and when its parts arrived.
#[derive(Debug)]
pub struct Response<T> {
    state: State,
    /// The head read so far; once read, the final head (interim ones are dropped).
    head: Vec<u8>,
    /// The request was a HEAD: no body whatever the head says.
    head_request: bool,
    pub status: Option<u16>,
    pub kind: BodyKind,
    framing: Framing,
    /// `Content-Length` as the head gave it.
    length: Option<u64>,
    chunked: Chunked,
    close: bool,
    line: Vec<u8>,
    /// Keep the body and its chunks ([`Response::keeping_body`]).
    keep: bool,
    /// The body as decoded (kept only on request): every byte of a length- or close-framed
    /// body, the data of every whole chunk of a chunked one.
    pub body: Vec<u8>,
    /// The data of each whole chunk, in order (kept only on request).
    pub chunks: Vec<Vec<u8>>,
    /// The data of the chunk being read.
    chunk: Vec<u8>,
    /// Lines of a stream that carried model output.
    pub content_lines: u32,
    /// Lines of a stream that were neither JSON nor an event the client knows.
    pub odd_lines: u32,
    pub first_byte: Option<T>,
    pub first_body: Option<T>,
    pub first_chunk: Option<T>,
    pub end: Option<T>,
}

impl<T: Copy> Response<T> {
    /// A response to come; `head_request`: it answers a HEAD, so it has no body.
    pub fn new(head_request: bool) -> Response<T> {
        Response {
            state: State::Head,
            head: Vec::new(),
            head_request,
            status: None,
            kind: BodyKind::Whole,
            framing: Framing::UntilClose,
            length: None,
            chunked: Chunked::default(),
            close: false,
            line: Vec::new(),
            keep: false,
            body: Vec::new(),
            chunks: Vec::new(),
            chunk: Vec::new(),
            content_lines: 0,
            odd_lines: 0,
            first_byte: None,
            first_body: None,
            first_chunk: None,
            end: None,
        }
    }

    /// The body of a response whose head was read elsewhere, framed by `framing`, kept.
    pub fn body_only(framing: Framing) -> Response<T> {
        let mut response = Response::new(false).keeping_body();
        response.framing = framing;
        response.state = State::Body;
        if framing == Framing::Length(0) {
            response.state = State::Done;
        }
        response
    }

    /// Keeps the body and its chunks ([`Response::body`], [`Response::chunks`]).
    pub fn keeping_body(mut self) -> Response<T> {
        self.keep = true;
        self
    }

    pub fn is_complete(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the whole (final) head has been read.
    pub fn has_head(&self) -> bool {
        self.state != State::Head
    }

    /// The final head as it came, status line to blank line; empty until it is whole.
    pub fn head(&self) -> &[u8] {
        match self.state {
            State::Head => &[],
            _ => &self.head,
        }
    }

    /// How the body ends (once the head is read).
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// `Content-Length` as the head gave it.
    pub fn content_length(&self) -> Option<u64> {
        self.length
    }

    /// Whether the connection can carry another request after this response.
    pub fn keeps_alive(&self) -> bool {
        self.is_complete() && !self.close && self.framing != Framing::UntilClose
    }

    /// Reads `bytes`, received at `at`. Returns how many belong to this response (a server
    /// sends nothing unasked, so the rest would be a protocol error for the caller to see, or
    /// the next response of a pipeline).
    pub fn feed(&mut self, bytes: &[u8], at: T) -> anyhow::Result<usize> {
        self.read(bytes, at, false)
    }

    /// As [`Response::feed`], but stops at the end of the (final) head: the body's bytes are
    /// left to the caller.
    pub fn feed_head(&mut self, bytes: &[u8], at: T) -> anyhow::Result<usize> {
        self.read(bytes, at, true)
    }

    fn read(&mut self, bytes: &[u8], at: T, head_only: bool) -> anyhow::Result<usize> {
        if bytes.is_empty() || self.state == State::Done {
            return Ok(0);
        }
        self.first_byte.get_or_insert(at);
        let mut used = 0;
        while self.state == State::Head {
            let before = self.head.len();
            self.head.extend_from_slice(&bytes[used..]);
            let Some(end) = self.read_head()? else {
                if self.head.len() > MAX_LINE {
                    bail!("response head over {MAX_LINE} bytes");
                }
                return Ok(bytes.len());
            };
            used += end - before;
            self.head.truncate(end);
            if self.state == State::Head {
                // An interim response was read; the real one follows.
                self.head.clear();
                if used == bytes.len() {
                    return Ok(used);
                }
            }
        }
        if self.state == State::Done {
            self.end = Some(at);
            return Ok(used);
        }
        if head_only {
            return Ok(used);
        }
        Ok(used + self.read_body(&bytes[used..], at)?)
    }

    fn read_body(&mut self, rest: &[u8], at: T) -> anyhow::Result<usize> {
        if self.state != State::Body {
            return Ok(0);
        }
        let taken = match self.framing {
            Framing::Length(left) => {
                let n = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                self.body(&rest[..n], at);
                self.framing = Framing::Length(left - n as u64);
                if left == n as u64 {
                    self.finish(at);
                }
                n
            }
            Framing::UntilClose => {
                self.body(rest, at);
                rest.len()
            }
            Framing::Chunked => {
                let mut events = Vec::new();
                let n = self.chunked.decode(rest, &mut |event| events.push(event))?;
                for event in events {
                    match event {
                        Piece::Data(data) => {
                            if self.keep {
                                self.chunk.extend_from_slice(data);
                            }
                            self.body(data, at);
                        }
                        Piece::End if self.keep => {
                            let chunk = std::mem::take(&mut self.chunk);
                            self.body.extend_from_slice(&chunk);
                            self.chunks.push(chunk);
                        }
                        Piece::End => {}
                    }
                }
                if self.chunked.is_done() {
                    self.finish(at);
                }
                n
            }
        };
        Ok(taken)
    }

    /// The connection closed at `at`: that ends a body framed by the close; any other
    /// unfinished response stays incomplete.
    pub fn closed(&mut self, at: T) {
        if self.state == State::Body && self.framing == Framing::UntilClose {
            self.finish(at);
        }
    }

    /// Parses the head read so far: `None` while it is partial, else the length of the head
    /// (an interim one leaves the state at `Head`).
    fn read_head(&mut self) -> anyhow::Result<Option<usize>> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let end = match response.parse(&self.head) {
            Ok(httparse::Status::Complete(end)) => end,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(err) => bail!(
                "not an HTTP/1 response head ({err}): {:?}",
                String::from_utf8_lossy(&self.head[..self.head.len().min(300)])
            ),
        };
        let status = response.code.context("a head without a status")?;
        if (100..200).contains(&status) {
            return Ok(Some(end));
        }
        self.status = Some(status);
        self.close = response.version == Some(0);
        let mut chunked = false;
        for header in response.headers.iter() {
            let value = String::from_utf8_lossy(header.value)
                .trim()
                .to_ascii_lowercase();
            match header.name.to_ascii_lowercase().as_str() {
                "content-length" => {
                    self.length = Some(value.parse::<u64>().context("bad Content-Length")?)
                }
                "transfer-encoding" => chunked = value.ends_with("chunked"),
                "connection" => self.close = value.contains("close"),
                "content-type" => {
                    self.kind = if value.starts_with("application/x-ndjson") {
                        BodyKind::Ndjson
                    } else if value.starts_with("text/event-stream") {
                        BodyKind::EventStream
                    } else {
                        BodyKind::Whole
                    }
                }
                _ => {}
            }
        }
        self.framing = match (chunked, self.length) {
            (true, _) => Framing::Chunked,
            (false, Some(n)) => Framing::Length(n),
            (false, None) => Framing::UntilClose,
        };
        let bodiless = self.head_request || status == 204 || status == 304;
        self.state = if bodiless || self.framing == Framing::Length(0) {
            State::Done
        } else {
            State::Body
        };
        Ok(Some(end))
    }

    fn body(&mut self, mut bytes: &[u8], at: T) {
        if bytes.is_empty() {
            return;
        }
        self.first_body.get_or_insert(at);
        if self.keep && self.framing != Framing::Chunked {
            self.body.extend_from_slice(bytes);
        }
        if self.kind == BodyKind::Whole {
            return;
        }
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            self.line.extend_from_slice(&bytes[..nl]);
            let line = std::mem::take(&mut self.line);
            self.end_line(&line, at);
            bytes = &bytes[nl + 1..];
        }
        self.line.extend_from_slice(bytes);
    }

    fn end_line(&mut self, line: &[u8], at: T) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match carries_output(self.kind, line) {
            Some(true) => {
                self.content_lines += 1;
                self.first_chunk.get_or_insert(at);
            }
            Some(false) => {}
            None => self.odd_lines += 1,
        }
    }

    fn finish(&mut self, at: T) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.end_line(&line, at);
        }
        self.state = State::Done;
        self.end = Some(at);
    }

    /// docs/DESIGN.md#engine-time-to-first-token: the first line of a stream carrying model
    /// output; the first body byte otherwise.
    pub fn first_output(&self) -> Option<T> {
        match self.kind {
            BodyKind::Whole => self.first_body,
            _ => self.first_chunk,
        }
    }
}

/// Whether one line of a stream carries model output (`None`: the line is not what the
/// stream's format allows). Ollama: a non-empty `message.content`, `message.thinking` or
/// `response`. OpenAI: a non-empty `choices[0].delta.content`.
pub fn carries_output(kind: BodyKind, line: &[u8]) -> Option<bool> {
    let text = std::str::from_utf8(line).ok()?;
    let non_empty = |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    match kind {
        BodyKind::Whole => Some(false),
        BodyKind::Ndjson => {
            if text.trim().is_empty() {
                return Some(false);
            }
            let doc: Value = serde_json::from_str(text).ok()?;
            let message = doc.get("message");
            Some(
                non_empty(message.and_then(|m| m.get("content")))
                    || non_empty(message.and_then(|m| m.get("thinking")))
                    || non_empty(doc.get("response")),
            )
        }
        BodyKind::EventStream => {
            let Some(data) = text.strip_prefix("data:") else {
                // Blank separators, comments and other fields carry no output.
                let field = text.is_empty() || text.contains(':');
                return field.then_some(false);
            };
            let data = data.trim_start();
            if data == "[DONE]" {
                return Some(false);
            }
            let doc: Value = serde_json::from_str(data).ok()?;
            let delta = doc
                .get("choices")
                .and_then(|c| c.get(0))
                .and_then(|c| c.get("delta"));
            Some(non_empty(delta.and_then(|d| d.get("content"))))
        }
    }
}

/// What the chunked decoder hands on: chunk data as it comes, and the end of each chunk (its
/// data and the CRLF after it read).
enum Piece<'a> {
    Data(&'a [u8]),
    End,
}

/// Chunked transfer coding, decoded as it arrives.
#[derive(Debug)]
enum Chunked {
    /// Reading a chunk-size line (extensions after `;` ignored).
    Size(Vec<u8>),
    /// This many data bytes left in the current chunk.
    Data(u64),
    /// This many bytes of the CRLF after a chunk's data already read.
    DataEnd(usize),
    /// Reading trailer lines after the last chunk, until an empty one.
    Trailer(Vec<u8>),
    Done,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked::Size(Vec::new())
    }
}

impl Chunked {
    fn is_done(&self) -> bool {
        matches!(self, Chunked::Done)
    }

    /// Decodes from `input`, handing each piece of chunk data and each chunk's end to `out`.
    /// Returns the bytes used: all of them, or fewer once the coding has ended.
    fn decode<'a>(
        &mut self,
        input: &'a [u8],
        out: &mut impl FnMut(Piece<'a>),
    ) -> anyhow::Result<usize> {
        let mut i = 0;
        while i < input.len() {
            match self {
                Chunked::Done => break,
                Chunked::Size(line) => {
                    let Some(used) = take_line(line, &input[i..])? else {
                        return Ok(input.len());
                    };
                    i += used;
                    let text = line.strip_suffix(b"\r").unwrap_or(line);
                    let size = std::str::from_utf8(text)
                        .ok()
                        .and_then(|t| t.split(';').next())
                        .and_then(|t| u64::from_str_radix(t.trim(), 16).ok())
                        .with_context(|| {
                            format!("bad chunk size {:?}", String::from_utf8_lossy(text))
                        })?;
                    *self = if size == 0 {
                        Chunked::Trailer(Vec::new())
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Trailer(line) => {
                    let Some(used) = take_line(line, &input[i..])? else {
                        return Ok(input.len());
                    };
                    i += used;
                    *self = if line.strip_suffix(b"\r").unwrap_or(line).is_empty() {
                        Chunked::Done
                    } else {
                        Chunked::Trailer(Vec::new())
                    };
                }
                Chunked::Data(left) => {
                    let n = (input.len() - i).min(usize::try_from(*left).unwrap_or(usize::MAX));
                    out(Piece::Data(&input[i..i + n]));
                    i += n;
                    *left -= n as u64;
                    if *left == 0 {
                        *self = Chunked::DataEnd(0);
                    }
                }
                Chunked::DataEnd(seen) => {
                    if input[i] != b"\r\n"[*seen] {
                        bail!("chunk data not followed by CRLF");
                    }
                    i += 1;
                    *seen += 1;
                    if *seen == 2 {
                        out(Piece::End);
                        *self = Chunked::Size(Vec::new());
                    }
                }
            }
        }
        Ok(i)
    }
}

/// Adds to `line` from `rest` up to a newline: `Some(bytes used)` once the line is whole (the
/// newline not kept), `None` when all of `rest` went in.
fn take_line(line: &mut Vec<u8>, rest: &[u8]) -> anyhow::Result<Option<usize>> {
    let nl = rest.iter().position(|&b| b == b'\n');
    line.extend_from_slice(&rest[..nl.unwrap_or(rest.len())]);
    if line.len() > MAX_LINE {
        bail!("chunk-size or trailer line over {MAX_LINE} bytes");
    }
    Ok(nl.map(|nl| nl + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(data: &str) -> String {
        format!("{:x}\r\n{data}\r\n", data.len())
    }

    fn chat_line(content: &str, done: bool) -> String {
        format!(
            r#"{{"model":"m","message":{{"role":"assistant","content":"{content}"}},"done":{done}}}"#
        ) + "\n"
    }

    /// An Ollama stream as `observer sim` writes it: one line per chunk.
    fn ndjson_stream() -> String {
        let mut s = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\
                     Transfer-Encoding: chunked\r\n\r\n"
            .to_owned();
        for (content, done) in [("", false), ("The", false), (" sky", false), ("", true)] {
            s += &chunk(&chat_line(content, done));
        }
        s + "0\r\n\r\n"
    }

    /// Feeds `bytes` split at `cuts`, read `n` arriving at time `n`.
    fn read_in_pieces(bytes: &[u8], cuts: &[usize]) -> (Response<usize>, usize) {
        let mut response = Response::new(false).keeping_body();
        let mut used = 0;
        let mut from = 0;
        for (n, &to) in cuts.iter().chain([&bytes.len()]).enumerate() {
            used += response.feed(&bytes[from..to], n).unwrap();
            from = to;
        }
        (response, used)
    }

    #[test]
    fn a_chunked_ndjson_stream_at_every_split() {
        let bytes = ndjson_stream();
        let bytes = bytes.as_bytes();
        let newline_after = |needle: &[u8]| {
            let at = bytes
                .windows(needle.len())
                .position(|w| w == needle)
                .unwrap();
            at + bytes[at..].iter().position(|&b| b == b'\n').unwrap()
        };
        // The first line with output ends at this newline.
        let first_content_end = newline_after(b"\"The\"");
        let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        // The first body byte is the first chunk's data, after its size line.
        let first_data = head_end + 4;
        for cut in 1..bytes.len() {
            let (r, used) = read_in_pieces(bytes, &[cut]);
            assert!(r.is_complete(), "cut at {cut}");
            assert_eq!(used, bytes.len());
            assert_eq!((r.status, r.kind), (Some(200), BodyKind::Ndjson));
            assert_eq!((r.content_lines, r.odd_lines), (2, 0), "cut at {cut}");
            assert_eq!(r.end, Some(1));
            assert!(r.keeps_alive());
            assert_eq!(
                r.first_body,
                Some(usize::from(cut <= first_data)),
                "cut at {cut}"
            );
            let line_done = cut > first_content_end;
            assert_eq!(r.first_chunk, Some(usize::from(!line_done)), "cut at {cut}");
            assert_eq!(r.chunks.len(), 4, "cut at {cut}");
            assert_eq!(r.chunks[1], chat_line("The", false).as_bytes());
            assert_eq!(r.body, r.chunks.concat());
            assert_eq!(&bytes[..head_end], r.head());
        }
        // One byte a read: the milestones land on the right reads.
        let cuts: Vec<usize> = (1..bytes.len()).collect();
        let (r, _) = read_in_pieces(bytes, &cuts);
        assert_eq!(r.content_lines, 2);
        assert_eq!(r.first_chunk, Some(first_content_end));
        assert_eq!(r.end, Some(bytes.len() - 1));
        assert_eq!(r.chunks.len(), 4);
    }

    #[test]
    fn chunk_extensions_trailers_and_what_follows_the_end() {
        let mut bytes = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                         3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"
            .to_owned();
        let len = bytes.len();
        bytes += "HTTP/1.1 200 OK\r\n";
        // The head ends at byte 47; read 1 ends inside the size line, read 2 brings the data.
        let (r, used) = read_in_pieces(bytes.as_bytes(), &[20, 50]);
        assert!(r.is_complete());
        assert_eq!(used, len);
        assert_eq!(
            (r.first_byte, r.first_body, r.end),
            (Some(0), Some(2), Some(2))
        );
        assert_eq!(r.body, b"abc");
    }

    #[test]
    fn malformed_chunking_is_an_error() {
        for bad in ["zz\r\nabc\r\n", "3\r\nabcX\r\n"] {
            let text = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{bad}");
            let mut r = Response::new(false);
            assert!(r.feed(text.as_bytes(), 0).is_err(), "{bad:?}");
        }
        let mut r = Response::new(false);
        assert!(r.feed(b"SSH-2.0-OpenSSH\r\n\r\n", 0).is_err());
        let mut r = Response::new(false);
        assert!(
            r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", 0)
                .is_err()
        );
    }

    #[test]
    fn server_sent_events_count_delta_content_only() {
        let event = |delta: &str| {
            format!(
                "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":null}}]}}\n\n"
            )
        };
        let mut s = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                     Transfer-Encoding: chunked\r\n\r\n"
            .to_owned();
        for e in [
            event(r#"{"role":"assistant","content":""}"#),
            event(r#"{"content":"Hi"}"#),
            event(r#"{"content":"!"}"#),
            event("{}"),
            "data: [DONE]\n\n".to_owned(),
        ] {
            s += &chunk(&e);
        }
        s += "0\r\n\r\n";
        let bytes = s.as_bytes();
        let second = bytes.windows(4).position(|w| w == b"\"Hi\"").unwrap();
        let (r, _) = read_in_pieces(bytes, &[second, second + 40]);
        assert_eq!(
            (r.kind, r.content_lines, r.odd_lines),
            (BodyKind::EventStream, 2, 0)
        );
        assert_eq!(r.first_chunk, Some(1));
        assert_eq!(r.first_output(), Some(1));
        assert_eq!(carries_output(BodyKind::EventStream, b"data: {oops"), None);
        assert_eq!(
            carries_output(BodyKind::EventStream, b": keep-alive"),
            Some(false)
        );
        assert_eq!(
            carries_output(BodyKind::EventStream, b"event: x"),
            Some(false)
        );
        assert_eq!(carries_output(BodyKind::EventStream, b"garbage"), None);
    }

    #[test]
    fn ndjson_output_fields_and_odd_lines() {
        let yes = [
            r#"{"response":"x","done":false}"#,
            r#"{"message":{"role":"assistant","thinking":"hm","content":""}}"#,
        ];
        let no = [
            r#"{"response":"","done":true}"#,
            r#"{"error":"model runner has unexpectedly stopped"}"#,
            r#"{"message":{"content":""},"content":"not the message's"}"#,
        ];
        for line in yes {
            assert_eq!(
                carries_output(BodyKind::Ndjson, line.as_bytes()),
                Some(true),
                "{line}"
            );
        }
        for line in no {
            assert_eq!(
                carries_output(BodyKind::Ndjson, line.as_bytes()),
                Some(false),
                "{line}"
            );
        }
        assert_eq!(carries_output(BodyKind::Ndjson, b"{\"a\":"), None);
    }

    #[test]
    fn content_length_bodies_and_close_delimited_ones() {
        let text = "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n\
                    Content-Length: 11\r\n\r\n{\"error\":1}";
        let cut = text.len() - 5;
        let (r, used) = read_in_pieces(text.as_bytes(), &[cut]);
        assert!(r.is_complete() && r.keeps_alive());
        assert_eq!(
            (r.status, used, r.first_body, r.first_output()),
            (Some(500), text.len(), Some(0), Some(0))
        );
        assert_eq!(
            (r.body.as_slice(), r.content_length()),
            (&b"{\"error\":1}"[..], Some(11))
        );

        let mut r = Response::new(false);
        r.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc", 0)
            .unwrap();
        assert!(!r.is_complete());
        r.closed(1);
        assert!(r.is_complete() && !r.keeps_alive());
        assert_eq!(r.end, Some(1));

        // An HTTP/1.0 response without a length ends with the connection.
        let mut r = Response::new(false).keeping_body();
        r.feed(b"HTTP/1.0 200 OK\r\n\r\nab", 0).unwrap();
        r.feed(b"c", 1).unwrap();
        assert_eq!((r.framing(), r.is_complete()), (Framing::UntilClose, false));
        r.closed(2);
        assert_eq!((r.body.as_slice(), r.keeps_alive()), (&b"abc"[..], false));

        // A chunked body cut short stays incomplete when the connection closes, and keeps
        // only its whole chunks.
        let stream = ndjson_stream();
        let mut r = Response::new(false).keeping_body();
        r.feed(&stream.as_bytes()[..stream.len() - 30], 0).unwrap();
        r.closed(1);
        assert!(!r.is_complete());
        assert_eq!((r.status, r.chunks.len()), (Some(200), 3));
        assert_eq!(r.body, r.chunks.concat());

        // No body: HEAD, 204, Content-Length 0; an interim 100 first.
        let mut r = Response::new(true);
        r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 3)
            .unwrap();
        assert_eq!((r.is_complete(), r.end), (true, Some(3)));
        let mut r = Response::new(false);
        r.feed(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            0,
        )
        .unwrap();
        assert_eq!((r.is_complete(), r.status), (true, Some(204)));
        assert_eq!(r.head(), b"HTTP/1.1 204 No Content\r\n\r\n");
    }

    #[test]
    fn the_head_alone_leaves_the_body_to_the_caller() {
        let text = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n";
        let head_end = 47;
        let mut r: Response<u8> = Response::new(false);
        assert_eq!(r.feed_head(&text[..10], 0).unwrap(), 10);
        assert!(!r.has_head());
        assert_eq!(r.feed_head(&text[10..], 1).unwrap(), head_end - 10);
        assert!(r.has_head() && !r.is_complete());
        assert_eq!(r.framing(), Framing::Chunked);
        let mut body: Response<u8> = Response::body_only(Framing::Chunked);
        assert_eq!(
            body.feed(&text[head_end..], 2).unwrap(),
            text.len() - head_end
        );
        assert!(body.is_complete());
        assert_eq!(body.chunks, [b"ab".to_vec()]);
    }
}
