//! The checks themselves, one HTTP/1.1 connection each, the way a user's client would reach
//! Ollama: a TCP connect, `GET /api/tags` (and `/api/ps`, `/api/version`), and a streamed
//! `POST /api/chat` timed to its first line.
//!
//! Owns the upstream address and the HTTP client (hyper's connection API, no pool: a fresh
//! connection per check, so a wedged keep-alive connection cannot hide a dead server). It
//! reports what happened and must not decide readiness; that is `state.rs`.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::{
    net::{TcpSocket, TcpStream},
    task::JoinHandle,
    time::Instant,
};

use crate::pipeline::own_ports::{OwnPort, OwnPorts};

/// Ollama's port when an address names none.
pub const DEFAULT_PORT: u16 = 11434;

/// Largest listing body read (`/api/tags` with hundreds of models is well under this).
const MAX_JSON_BYTES: usize = 4 << 20;
/// Longest error text kept from a response.
const MAX_ERROR_CHARS: usize = 200;

/// Where Ollama listens: `host:port`, `http://host:port`, `[::1]:11434`, or a bare host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    host: String,
    port: u16,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Upstream {
    /// `127.0.0.1:port`: a server on this host.
    pub fn loopback(port: u16) -> Upstream {
        Upstream {
            host: "127.0.0.1".to_owned(),
            port,
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl FromStr for Upstream {
    type Err = String;

    fn from_str(text: &str) -> Result<Upstream, String> {
        if text.starts_with("https://") {
            return Err(format!(
                "{text:?}: https is not supported; Ollama speaks plain HTTP (give host:port)"
            ));
        }
        let rest = text.strip_prefix("http://").unwrap_or(text);
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') {
            return Err(format!("{text:?}: give host:port without a path"));
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| format!("{text:?}: unclosed '[' in the address"))?;
                match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None if after.is_empty() => (host, None),
                    None => return Err(format!("{text:?}: expected ':port' after ']'")),
                }
            }
            None => match authority.rsplit_once(':') {
                Some((host, _)) if host.contains(':') => {
                    return Err(format!("{text:?}: write an IPv6 address as [addr]:port"));
                }
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return Err(format!("{text:?}: the host is missing"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("{text:?}: {port:?} is not a port (1-65535)"))?,
        };
        Ok(Upstream {
            host: host.to_owned(),
            port,
        })
    }
}

/// Why a check failed, as one line for logs, `/ready/model` and `observer probe`.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot connect to {upstream}: {source}")]
    Connect {
        upstream: String,
        source: std::io::Error,
    },
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("no first chunk within {}", humantime::format_duration(*.0))]
    NoFirstChunk(Duration),
    #[error("HTTP {status}{}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Status { status: u16, message: String },
    #[error("the model answered with an error: {0}")]
    ModelError(String),
    #[error("{0}")]
    Protocol(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
}

impl CheckError {
    /// Whether the upstream could not be reached at all (as opposed to answering badly).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, CheckError::Connect { .. })
    }
}

/// A connection in use: its driver task is aborted when the check is done with it (even on a
/// timeout), and its port stays listed as the daemon's own until then.
struct Connection {
    driver: JoinHandle<()>,
    _port: OwnPort,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Makes the checks' connections to one upstream.
#[derive(Debug, Clone)]
pub struct Client {
    upstream: Upstream,
    own_ports: OwnPorts,
}

impl Client {
    /// A client whose connections are listed in `own_ports`, so that the capture ignores the
    /// upstream's end of them.
    pub fn new(upstream: Upstream, own_ports: OwnPorts) -> Client {
        Client {
            upstream,
            own_ports,
        }
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Binds before connecting, so that the local port is listed before the server accepts.
    async fn connect(&self) -> Result<(TcpStream, OwnPort), CheckError> {
        let failed = |source| CheckError::Connect {
            upstream: self.upstream.to_string(),
            source,
        };
        let addrs = tokio::net::lookup_host((self.upstream.host.as_str(), self.upstream.port))
            .await
            .map_err(failed)?;
        let mut last =
            std::io::Error::new(std::io::ErrorKind::NotFound, "the host name has no address");
        for addr in addrs {
            let attempt = async {
                let socket = if addr.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                let any = if addr.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                };
                socket.bind(SocketAddr::new(any, 0))?;
                let port = self.own_ports.register(socket.local_addr()?.port());
                let stream = socket.connect(addr).await?;
                Ok::<_, std::io::Error>((stream, port))
            };
            match attempt.await {
                Ok((stream, port)) => {
                    // Latency is what is measured; a coalesced first chunk would be a late one.
                    let _ = stream.set_nodelay(true);
                    return Ok((stream, port));
                }
                Err(err) => last = err,
            }
        }
        Err(failed(last))
    }

    /// Sends one request on a new connection and returns the response head.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(Response<Incoming>, Connection), CheckError> {
        let (stream, port) = self.connect().await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
        let conn = Connection {
            driver: tokio::spawn(async move {
                let _ = conn.await;
            }),
            _port: port,
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.upstream.to_string())
            .header(
                header::USER_AGENT,
                concat!("observer-probe/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|err| CheckError::Protocol(format!("building the request: {err}")))?;
        let response = sender.send_request(request).await?;
        Ok((response, conn))
    }
}

/// The `error` field of an Ollama error body, or the body's start.
fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: String,
    }
    let text = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(parsed) => parsed.error,
        Err(_) => String::from_utf8_lossy(body).trim().to_owned(),
    };
    one_line(&text)
}

fn one_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    match line.char_indices().nth(MAX_ERROR_CHARS) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_owned(),
    }
}

async fn read_body(body: Incoming) -> Result<Bytes, CheckError> {
    Limited::new(body, MAX_JSON_BYTES)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|err| CheckError::Protocol(format!("reading the body: {err}")))
}

impl Client {
    /// Opens (and closes) a TCP connection.
    pub async fn tcp(&self, timeout: Duration) -> Result<(), CheckError> {
        tokio::time::timeout(timeout, self.connect())
            .await
            .map_err(|_| CheckError::Timeout(timeout))?
            .map(drop)
    }

    /// `GET path`, answered 200 with a JSON body of type `T`.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<T, CheckError> {
        let exchange = async {
            let (response, _conn) = self.send(Method::GET, path, None).await?;
            let status = response.status();
            let body = read_body(response.into_body()).await?;
            if status != StatusCode::OK {
                return Err(CheckError::Status {
                    status: status.as_u16(),
                    message: error_message(&body),
                });
            }
            serde_json::from_slice(&body).map_err(|err| {
                CheckError::Protocol(format!("{path} answered unexpected JSON: {err}"))
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| CheckError::Timeout(timeout))?
    }
}

/// One entry of `/api/tags` or `/api/ps`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ListedModel {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub size: u64,
    /// `/api/ps` only: bytes of the model in GPU memory.
    #[serde(default)]
    pub size_vram: u64,
    /// `/api/ps` only: the context length the model was loaded with (Ollama 0.6.6 and later).
    #[serde(default)]
    pub context_length: Option<u64>,
}

/// The body of `/api/tags` and `/api/ps`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelList {
    pub models: Vec<ListedModel>,
}

/// The body of `/api/version`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Version {
    pub version: String,
}

impl ListedModel {
    /// Whether this entry is `wanted`, as Ollama resolves names (`qwen3` is `qwen3:latest`).
    pub fn is(&self, wanted: &str) -> bool {
        let normalized = |name: &str| {
            if name.contains(':') {
                name.to_owned()
            } else {
                format!("{name}:latest")
            }
        };
        let wanted = normalized(wanted);
        [&self.name, &self.model]
            .iter()
            .any(|n| !n.is_empty() && normalized(n) == wanted)
    }
}

/// When a streamed chat answered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Generation {
    /// Request start to the first streamed line that is not an error.
    pub first_chunk: Duration,
    /// Request start to the final (`"done": true`) line.
    pub total: Duration,
}

/// The smallest chat that makes the model produce a token.
fn chat_body(model: &str) -> Vec<u8> {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Reply with one word: ready."}],
        "stream": true,
        "options": {"num_predict": 1},
    })
    .to_string()
    .into_bytes()
}

#[derive(Deserialize)]
struct StreamLine {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    done: bool,
}

/// The NDJSON lines of a streamed response body, as they arrive.
struct LineStream {
    body: Incoming,
    pending: Vec<u8>,
}

impl LineStream {
    /// The next line that is not blank; an `{"error": ...}` line is an error.
    async fn next(&mut self) -> Result<StreamLine, CheckError> {
        loop {
            while let Some(end) = memchr::memchr(b'\n', &self.pending) {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let parsed: StreamLine = serde_json::from_slice(&line).map_err(|err| {
                    CheckError::Protocol(format!("unreadable stream line: {err}"))
                })?;
                if let Some(error) = parsed.error {
                    return Err(CheckError::ModelError(one_line(&error)));
                }
                return Ok(parsed);
            }
            if self.pending.len() > MAX_JSON_BYTES {
                return Err(CheckError::Protocol("a stream line is too long".into()));
            }
            let Some(frame) = self.body.frame().await else {
                return Err(CheckError::Protocol(
                    "the stream ended without a final line".into(),
                ));
            };
            if let Ok(data) = frame?.into_data() {
                self.pending.extend_from_slice(&data);
            }
        }
    }
}

impl Client {
    /// A streamed `POST /api/chat` for `model`: the first line must come within `first_chunk`
    /// of the start and the final line within `total`. Any streamed line counts as the first chunk:
    /// Ollama writes one only after the model produced a token (a thinking model's first token
    /// may carry no `content`).
    pub async fn generate(
        &self,
        model: &str,
        first_chunk: Duration,
        total: Duration,
    ) -> Result<Generation, CheckError> {
        let start = Instant::now();
        let opening = async {
            let (response, conn) = self
                .send(Method::POST, "/api/chat", Some(chat_body(model)))
                .await?;
            let status = response.status();
            if status != StatusCode::OK {
                let body = read_body(response.into_body()).await?;
                return Err(CheckError::Status {
                    status: status.as_u16(),
                    message: error_message(&body),
                });
            }
            let mut lines = LineStream {
                body: response.into_body(),
                pending: Vec::new(),
            };
            let first = lines.next().await?;
            Ok((lines, first.done, conn))
        };
        let (mut lines, mut done, _conn) = tokio::time::timeout_at(start + first_chunk, opening)
            .await
            .map_err(|_| CheckError::NoFirstChunk(first_chunk))??;
        let first_chunk = start.elapsed();
        let rest = async {
            while !done {
                done = lines.next().await?.done;
            }
            Ok::<_, CheckError>(())
        };
        tokio::time::timeout_at(start + total, rest)
            .await
            .map_err(|_| CheckError::Timeout(total))??;
        Ok(Generation {
            first_chunk,
            total: start.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_addresses() {
        let ok = [
            ("127.0.0.1:11434", "127.0.0.1:11434"),
            ("http://127.0.0.1:8080/", "127.0.0.1:8080"),
            ("localhost", "localhost:11434"),
            ("[::1]:9000", "[::1]:9000"),
            ("http://[::1]", "[::1]:11434"),
        ];
        for (text, shown) in ok {
            assert_eq!(text.parse::<Upstream>().unwrap().to_string(), shown);
        }
        let bad = [
            ("https://h:1", "https is not supported"),
            ("http://h:1/api", "without a path"),
            (":11434", "host is missing"),
            ("h:0", "not a port"),
            ("h:http", "not a port"),
            ("::1:80", "[addr]:port"),
            ("[::1", "unclosed"),
        ];
        for (text, message) in bad {
            let err = text.parse::<Upstream>().unwrap_err();
            assert!(err.contains(message), "{text}: {err}");
        }
    }

    #[test]
    fn model_names_resolve_like_ollama() {
        let listed = ListedModel {
            name: "qwen3:latest".into(),
            model: "qwen3:latest".into(),
            size: 0,
            size_vram: 0,
            context_length: None,
        };
        assert!(listed.is("qwen3"));
        assert!(listed.is("qwen3:latest"));
        assert!(!listed.is("qwen3:0.6b"));
        assert!(!listed.is("qwen"));
    }

    #[test]
    fn error_bodies_become_one_short_line() {
        assert_eq!(
            error_message(br#"{"error":"model 'x' not found"}"#),
            "model 'x' not found"
        );
        assert_eq!(
            error_message(b"404 page not found\nmore"),
            "404 page not found"
        );
        let long = "e".repeat(500);
        assert_eq!(one_line(&long).chars().count(), MAX_ERROR_CHARS + 1);
    }
}
