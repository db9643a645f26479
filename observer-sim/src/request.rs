//! Reading HTTP/1.x requests off one connection: heads with `httparse`, bodies framed by
//! Content-Length or chunked transfer coding, `Expect: 100-continue`, pipelined requests kept
//! in the buffer for the next call.
//!
//! Memory is bounded by [`Limits`]: a head or body over its limit is an error, never a bigger
//! buffer. Malformed input is a [`RequestError`] carrying the reply Go's net/http would give;
//! nothing here panics on input. Routing and responses live elsewhere.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::chunked::ChunkedBody;

/// Bounds on what one request may occupy in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request line plus headers.
    pub max_head_bytes: usize,
    /// Decoded body.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head_bytes: 64 * 1024,
            max_body_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Most headers a request may carry (Go has no count limit, only a byte limit).
const MAX_HEADERS: usize = 128;

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    /// HTTP/1.1 or later (else HTTP/1.0).
    pub http11: bool,
    /// Header names as sent, values as bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Request {
    /// First value of a header, by case-insensitive name, if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Whether the client wants the connection closed after this exchange. HTTP/1.0 clients
    /// always get a close (the simulator does not do 1.0 keep-alive).
    pub fn wants_close(&self) -> bool {
        !self.http11 || self.has_token("connection", "close")
    }

    /// HEAD: the response carries headers only.
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

/// Why no request could be read. Each variant knows the reply Go would send before closing.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The client closed cleanly between requests.
    #[error("connection closed")]
    Closed,
    #[error("connection closed in the middle of a request")]
    Truncated,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("missing required Host header")]
    MissingHost,
    #[error("request head exceeds {0} bytes")]
    HeadTooLarge(usize),
    #[error("request body exceeds {0} bytes")]
    BodyTooLarge(usize),
    #[error("unsupported transfer coding")]
    UnsupportedTransferCoding,
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

const ERROR_HEADERS: &str =
    "\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n";

impl RequestError {
    /// The bytes Go's `net/http` server writes for this error before closing (it writes them
    /// raw: no Date, no Content-Length). `None` when there is nobody to answer.
    pub fn reply(&self) -> Option<String> {
        let (status, body) = match self {
            Self::Closed | Self::Truncated | Self::Io(_) => return None,
            Self::Malformed(_) => ("400 Bad Request", "400 Bad Request"),
            Self::MissingHost => (
                "400 Bad Request: missing required Host header",
                "400 Bad Request: missing required Host header",
            ),
            Self::HeadTooLarge(_) => (
                "431 Request Header Fields Too Large",
                "431 Request Header Fields Too Large",
            ),
            // Go has no body limit of its own; this one is the simulator's, in Go's style.
            Self::BodyTooLarge(_) => (
                "413 Request Entity Too Large",
                "413 Request Entity Too Large",
            ),
            Self::UnsupportedTransferCoding => {
                ("501 Not Implemented", "Unsupported transfer encoding")
            }
        };
        Some(format!("HTTP/1.1 {status}{ERROR_HEADERS}{body}"))
    }
}

enum BodyFraming {
    None,
    Length(usize),
    Chunked,
}

/// Reads successive requests from one connection; bytes past a request stay buffered for the
/// next (pipelining).
pub struct RequestReader {
    buf: Vec<u8>,
    limits: Limits,
}

impl RequestReader {
    pub fn new(limits: Limits) -> Self {
        Self {
            buf: Vec::with_capacity(8 * 1024),
            limits,
        }
    }

    /// Reads the next whole request. Sends `100 Continue` itself when the client asks for it.
    pub async fn next(&mut self, stream: &mut TcpStream) -> Result<Request, RequestError> {
        let (mut request, head_len, framing, expects_continue) = loop {
            if let Some(parsed) = self.parse_head()? {
                break parsed;
            }
            if self.buf.len() > self.limits.max_head_bytes {
                return Err(RequestError::HeadTooLarge(self.limits.max_head_bytes));
            }
            if self.fill(stream).await? == 0 {
                return Err(if self.buf.iter().all(u8::is_ascii_whitespace) {
                    RequestError::Closed
                } else {
                    RequestError::Truncated
                });
            }
        };
        self.buf.drain(..head_len);

        let body_expected = match framing {
            BodyFraming::None | BodyFraming::Length(0) => false,
            BodyFraming::Length(_) | BodyFraming::Chunked => true,
        };
        if expects_continue && body_expected {
            stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        request.body = match framing {
            BodyFraming::None => Vec::new(),
            BodyFraming::Length(len) => {
                while self.buf.len() < len {
                    if self.fill(stream).await? == 0 {
                        return Err(RequestError::Truncated);
                    }
                }
                self.buf.drain(..len).collect()
            }
            BodyFraming::Chunked => {
                let mut decoder = ChunkedBody::new(self.limits.max_body_bytes);
                loop {
                    let used = decoder.feed(&self.buf)?;
                    self.buf.drain(..used);
                    if decoder.is_done() {
                        break decoder.into_body();
                    }
                    if self.fill(stream).await? == 0 {
                        return Err(RequestError::Truncated);
                    }
                }
            }
        };
        Ok(request)
    }

    async fn fill(&mut self, stream: &mut TcpStream) -> Result<usize, RequestError> {
        let mut chunk = [0u8; 16 * 1024];
        let n = stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Parses a complete head at the start of the buffer, if there is one.
    fn parse_head(&self) -> Result<Option<(Request, usize, BodyFraming, bool)>, RequestError> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut head = httparse::Request::new(&mut slots);
        let head_len = match head.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(RequestError::HeadTooLarge(self.limits.max_head_bytes));
            }
            Err(_) => return Err(RequestError::Malformed("unparsable request head")),
        };
        if head_len > self.limits.max_head_bytes {
            return Err(RequestError::HeadTooLarge(self.limits.max_head_bytes));
        }
        let (Some(method), Some(target), Some(version)) = (head.method, head.path, head.version)
        else {
            return Err(RequestError::Malformed("incomplete request line"));
        };
        let request = Request {
            method: method.to_owned(),
            path: target.split('?').next().unwrap_or(target).to_owned(),
            http11: version >= 1,
            headers: head
                .headers
                .iter()
                .map(|h| (h.name.to_owned(), h.value.to_vec()))
                .collect(),
            body: Vec::new(),
        };
        if request.http11 && request.header("host").is_none() {
            return Err(RequestError::MissingHost);
        }
        let framing = self.framing(&request)?;
        let expects_continue = request.http11
            && request
                .header("expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        Ok(Some((request, head_len, framing, expects_continue)))
    }

    fn framing(&self, request: &Request) -> Result<BodyFraming, RequestError> {
        let codings: Vec<&str> = request
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
            .map(|(_, v)| {
                std::str::from_utf8(v).map_err(|_| RequestError::Malformed("bad Transfer-Encoding"))
            })
            .collect::<Result<_, _>>()?;
        if !codings.is_empty() {
            // Like Go: only a lone "chunked" is understood, and it overrides Content-Length.
            let all: Vec<&str> = codings
                .iter()
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .collect();
            return match all.as_slice() {
                [one] if one.eq_ignore_ascii_case("chunked") => Ok(BodyFraming::Chunked),
                _ => Err(RequestError::UnsupportedTransferCoding),
            };
        }
        let mut length: Option<usize> = None;
        for (_, value) in request
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        {
            let text = std::str::from_utf8(value)
                .map_err(|_| RequestError::Malformed("bad Content-Length"))?;
            let text = text.trim();
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(RequestError::Malformed("bad Content-Length"));
            }
            // A value too large for usize is certainly over the limit.
            let parsed = text.parse::<usize>().unwrap_or(usize::MAX);
            if length.is_some_and(|seen| seen != parsed) {
                return Err(RequestError::Malformed("conflicting Content-Length"));
            }
            length = Some(parsed);
        }
        match length {
            Some(len) if len > self.limits.max_body_bytes => {
                Err(RequestError::BodyTooLarge(self.limits.max_body_bytes))
            }
            Some(len) => Ok(BodyFraming::Length(len)),
            None => Ok(BodyFraming::None),
        }
    }
}
