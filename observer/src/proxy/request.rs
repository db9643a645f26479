//! What the proxy must know of a request before it forwards it: the head (method, path,
//! framing, keep-alive, upgrade), the end of a chunked body, and the model a body names.
//!
//! Pure parsing of client bytes; the engine does the full job for metrics. It must not copy
//! bodies: the forwarder moves them as they come.

use memchr::memmem;

/// Largest request head accepted (431 above), as Go's net/http allows by default (1 MiB is
/// Go's; Ollama's clients send a few hundred bytes).
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// Longest model name read from a body.
const MAX_MODEL: usize = 256;

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head, final CRLF included.
    pub len: usize,
    pub method: String,
    /// The request target as sent.
    pub target: String,
    pub body: Body,
    pub expect_continue: bool,
    /// Whether the client keeps the connection after this exchange.
    pub keep_alive: bool,
    /// CONNECT or an `Upgrade` request: after the response the connection may become a tunnel.
    pub upgrade: bool,
}

impl RequestHead {
    /// Requests whose body names a model (the readiness gate reads it).
    pub fn names_a_model(&self) -> bool {
        let path = self.target.split('?').next().unwrap_or_default();
        self.method == "POST"
            && matches!(
                path,
                "/api/chat"
                    | "/api/generate"
                    | "/api/embed"
                    | "/api/embeddings"
                    | "/v1/chat/completions"
                    | "/v1/completions"
                    | "/v1/embeddings"
            )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
}

impl HeadError {
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge => 431,
            HeadError::Malformed(_) => 400,
        }
    }
}

/// Parses a head at the start of `buf`: `Ok(None)` while it is incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<RequestHead>, HeadError> {
    // Left uninitialised: the parser writes the ones it fills.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(err) => return Err(HeadError::Malformed(err.to_string())),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let method = request.method.unwrap_or_default().to_owned();
    let http10 = request.version == Some(0);
    let mut body = Body::None;
    let mut length: Option<u64> = None;
    let mut expect_continue = false;
    let mut connection_close = http10;
    let mut upgrade = method == "CONNECT";
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value)
            .map_err(|_| HeadError::Malformed(format!("header {} is not text", header.name)))?
            .trim();
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| HeadError::Malformed(format!("Content-Length {value:?}")))?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Malformed("two different Content-Length".into()));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value.rsplit(',').next().unwrap_or_default().trim();
            if !last.eq_ignore_ascii_case("chunked") {
                return Err(HeadError::Malformed(format!(
                    "Transfer-Encoding {value:?} without chunked last"
                )));
            }
            body = Body::Chunked;
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    connection_close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    connection_close = false;
                }
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if body != Body::Chunked
        && let Some(n) = length
    {
        body = if n == 0 { Body::None } else { Body::Length(n) };
    }
    Ok(Some(RequestHead {
        len,
        method,
        target: request.path.unwrap_or_default().to_owned(),
        body,
        expect_continue,
        keep_alive: !connection_close,
        upgrade,
    }))
}

/// Finds the end of a chunked body in the bytes that follow its head, piece by piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedBody {
    Size { size: u64, digits: u8 },
    Extension { size: u64 },
    Data(u64),
    DataEnd,
    TrailerStart,
    TrailerLine,
}

impl Default for ChunkedBody {
    fn default() -> Self {
        ChunkedBody::Size { size: 0, digits: 0 }
    }
}

impl ChunkedBody {
    /// Reads `bytes`; returns how many of them belong to the body when its end is among them.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, HeadError> {
        let bad = |what: &str| Err(HeadError::Malformed(format!("chunked body: {what}")));
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            *self = match *self {
                ChunkedBody::Data(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    if take == left {
                        ChunkedBody::DataEnd
                    } else {
                        ChunkedBody::Data(left - take)
                    }
                }
                ChunkedBody::Size { size, digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if digits >= 16 {
                            return bad("chunk size too long");
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        i += 1;
                        ChunkedBody::Size {
                            size: size * 16 + d,
                            digits: digits + 1,
                        }
                    }
                    _ if digits == 0 => return bad("missing chunk size"),
                    b'\n' => {
                        i += 1;
                        Self::after_size(size)
                    }
                    _ => {
                        i += 1;
                        ChunkedBody::Extension { size }
                    }
                },
                ChunkedBody::Extension { size } => {
                    i += 1;
                    if b == b'\n' {
                        Self::after_size(size)
                    } else {
                        ChunkedBody::Extension { size }
                    }
                }
                ChunkedBody::DataEnd => {
                    i += 1;
                    match b {
                        b'\r' => ChunkedBody::DataEnd,
                        b'\n' => ChunkedBody::default(),
                        _ => return bad("chunk data longer than its size"),
                    }
                }
                ChunkedBody::TrailerStart => {
                    i += 1;
                    match b {
                        b'\r' => ChunkedBody::TrailerStart,
                        b'\n' => return Ok(Some(i)),
                        _ => ChunkedBody::TrailerLine,
                    }
                }
                ChunkedBody::TrailerLine => {
                    i += 1;
                    if b == b'\n' {
                        ChunkedBody::TrailerStart
                    } else {
                        ChunkedBody::TrailerLine
                    }
                }
            };
        }
        Ok(None)
    }

    fn after_size(size: u64) -> ChunkedBody {
        if size == 0 {
            ChunkedBody::TrailerStart
        } else {
            ChunkedBody::Data(size)
        }
    }
}

/// The `"model"` a JSON request body names, from its first bytes.
pub fn model_of(body: &[u8]) -> Option<String> {
    let mut from = 0;
    while let Some(at) = memmem::find(&body[from..], b"\"model\"") {
        let rest = &body[from + at + 7..];
        from += at + 7;
        let rest = trim_start(rest);
        let Some(rest) = rest.strip_prefix(b":") else {
            continue;
        };
        let rest = trim_start(rest);
        if rest.first() != Some(&b'"') {
            continue;
        }
        // The closing quote is the first one not escaped.
        let mut end = 1;
        while end < rest.len().min(MAX_MODEL + 2) {
            match rest[end] {
                b'\\' => end += 2,
                b'"' => return serde_json::from_slice::<String>(&rest[..=end]).ok(),
                _ => end += 1,
            }
        }
        return None;
    }
    None
}

fn trim_start(bytes: &[u8]) -> &[u8] {
    let skip = bytes.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &bytes[skip..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_their_framing() {
        let head = parse(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n{}")
            .unwrap()
            .unwrap();
        assert_eq!(head.len, 56);
        assert_eq!(head.body, Body::Length(12));
        assert!(head.keep_alive && head.names_a_model() && !head.upgrade);
        let head = parse(
            b"POST /v1/chat/completions?x=1 HTTP/1.0\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.body, Body::Chunked);
        assert!(!head.keep_alive && head.names_a_model());
        let head = parse(b"GET / HTTP/1.1\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\nExpect: 100-continue\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(head.upgrade && !head.keep_alive && head.expect_continue);
        assert_eq!(head.body, Body::None);
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap(), None);
    }

    #[test]
    fn bad_heads_are_errors_with_a_status() {
        let cases: [&[u8]; 3] = [
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        ];
        for case in cases {
            assert_eq!(parse(case).unwrap_err().status(), 400);
        }
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(parse(&big), Err(HeadError::TooLarge));
    }

    #[test]
    fn the_end_of_a_chunked_body_split_anywhere() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\nGET";
        let end = body.len() - 3;
        for cut in 0..body.len() {
            let mut scanner = ChunkedBody::default();
            let first = scanner.feed(&body[..cut]).unwrap();
            let found = match first {
                Some(n) => n,
                None => cut + scanner.feed(&body[cut..]).unwrap().unwrap(),
            };
            assert_eq!(found, end, "cut at {cut}");
        }
        let mut scanner = ChunkedBody::default();
        assert_eq!(scanner.feed(b"0\n\n").unwrap(), Some(3));
        assert!(ChunkedBody::default().feed(b"zz\r\n").is_err());
        assert!(ChunkedBody::default().feed(b"1\r\nab").is_err());
    }

    #[test]
    fn the_model_a_body_names() {
        assert_eq!(
            model_of(br#"{"model": "qwen3:0.6b", "messages": []}"#).as_deref(),
            Some("qwen3:0.6b")
        );
        assert_eq!(
            model_of(br#"{"messages":[{"content":"say \"model\""}],"model":"a\"b"}"#).as_deref(),
            Some("a\"b")
        );
        assert_eq!(model_of(br#"{"prompt":"x"}"#), None);
        assert_eq!(model_of(br#"{"model": 3}"#), None);
        assert_eq!(model_of(br#"{"model":"unterminated"#), None);
    }
}
