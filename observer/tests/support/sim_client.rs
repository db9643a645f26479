//! A raw HTTP/1.1 client for black-box tests of servers we write (`observer sim` first):
//! it reads heads and bodies itself, so tests can check framing, chunk boundaries, resets and
//! early closes byte for byte, which a high-level client would hide.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use observer_sim::{SimConfig, SimServer, Timing, spawn};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const WAIT: Duration = Duration::from_secs(5);
pub const TOKENS: u32 = 4;

pub fn fast_config() -> SimConfig {
    SimConfig {
        timing: Timing {
            load: Duration::from_millis(5),
            first_token: Duration::from_millis(5),
            token_interval: Duration::from_millis(1),
            tokens_per_reply: TOKENS,
        },
        seed: Some(7),
        // Requests sent at once run at once (Ollama's default of one slot would queue them).
        num_parallel: 64,
        ..SimConfig::default()
    }
}

pub async fn start(config: SimConfig) -> SimServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    spawn(listener, config).unwrap()
}

/// How a response body ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// The last chunk (or all of a Content-Length body) arrived.
    Complete,
    /// The server closed: the end of an HTTP/1.0 body, or a truncated one.
    Eof,
    Reset,
}

#[derive(Debug)]
pub struct Reply {
    /// Status line and headers, the Date value replaced by `<date>`.
    pub head: String,
    pub body: Vec<u8>,
    /// Payloads of the chunks, for a chunked body.
    pub chunks: Vec<Vec<u8>>,
    pub ending: Ending,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(": ")?;
            n.eq_ignore_ascii_case(name).then_some(v)
        })
    }
}

pub struct Client {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads more bytes: `Ok(0)` at EOF.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("no answer within 5 s")?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Fills until `want` bytes are buffered; the ending if the stream ends first.
    pub async fn fill_to(&mut self, want: usize) -> Option<Ending> {
        while self.buf.len() < want {
            match self.fill().await {
                Ok(0) => return Some(Ending::Eof),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Some(Ending::Reset),
                Err(e) => panic!("read failed: {e}"),
            }
        }
        None
    }

    pub async fn head(&mut self) -> (String, usize, Option<usize>, bool) {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(len) = response.parse(&self.buf).unwrap() {
                let raw = String::from_utf8(self.buf[..len].to_vec()).unwrap();
                let head = raw
                    .lines()
                    .map(|l| match l.strip_prefix("Date: ") {
                        Some(date) => {
                            assert!(date.len() == 29 && date.ends_with(" GMT"), "Date {date:?}");
                            "Date: <date>".to_owned()
                        }
                        None => l.to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join("\r\n");
                let length = response.headers.iter().find(|h| h.name == "Content-Length");
                let length = length.map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap());
                let chunked = response
                    .headers
                    .iter()
                    .any(|h| h.name == "Transfer-Encoding");
                self.buf.drain(..len);
                return (head, len, length, chunked);
            }
            assert!(
                self.fill().await.unwrap() > 0,
                "closed before a whole head: {:?}",
                self.buf
            );
        }
    }

    pub async fn reply(&mut self) -> Reply {
        self.reply_framed(false).await
    }

    pub async fn reply_to_head_request(&mut self) -> Reply {
        self.reply_framed(true).await
    }

    pub async fn reply_framed(&mut self, head_request: bool) -> Reply {
        let (head, _, length, chunked) = self.head().await;
        let mut reply = Reply {
            head,
            body: Vec::new(),
            chunks: Vec::new(),
            ending: Ending::Complete,
        };
        if head_request {
            return reply;
        }
        if let Some(len) = length {
            if let Some(ending) = self.fill_to(len).await {
                reply.ending = ending;
            }
            reply.body = self.buf.drain(..len.min(self.buf.len())).collect();
        } else if chunked {
            reply.ending = self.chunks(&mut reply).await;
        } else {
            reply.ending = loop {
                if let Some(ending) = self.fill_to(self.buf.len() + 1).await {
                    break ending;
                }
            };
            reply.body = std::mem::take(&mut self.buf);
        }
        reply
    }

    pub async fn chunks(&mut self, reply: &mut Reply) -> Ending {
        loop {
            let (line, size) = loop {
                match httparse::parse_chunk_size(&self.buf).unwrap() {
                    httparse::Status::Complete(parsed) => break parsed,
                    httparse::Status::Partial => {
                        if let Some(ending) = self.fill_to(self.buf.len() + 1).await {
                            return ending;
                        }
                    }
                }
            };
            let size = size as usize;
            if let Some(ending) = self.fill_to(line + size + 2).await {
                return ending;
            }
            assert_eq!(&self.buf[line + size..line + size + 2], b"\r\n");
            let data: Vec<u8> = self.buf[line..line + size].to_vec();
            self.buf.drain(..line + size + 2);
            if size == 0 {
                return Ending::Complete;
            }
            reply.body.extend_from_slice(&data);
            reply.chunks.push(data);
        }
    }

    /// True when the server closed the connection (EOF or reset) and sent nothing more.
    pub async fn closed(&mut self) -> bool {
        self.fill_to(self.buf.len() + 1).await.is_some() && self.buf.is_empty()
    }
}

pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: sim\r\n\r\n").into_bytes()
}

pub fn post(path: &str, body: &str) -> Vec<u8> {
    post_with(path, "", body)
}

pub fn post_with(path: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

pub async fn exchange(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut client = Client::connect(addr).await;
    client.send(request).await;
    client.reply().await
}

pub const CHAT: &str =
    r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"Why is the sky blue?"}]}"#;

/// Replaces the values of the named JSON fields (numbers or strings) by `_`.
pub fn redact(json: &str, keys: &[&str]) -> String {
    let mut out = json.to_owned();
    for key in keys {
        let marker = format!("\"{key}\":");
        let Some(start) = out.find(&marker).map(|i| i + marker.len()) else {
            continue;
        };
        let end = if out[start..].starts_with('"') {
            start + 1 + out[start + 1..].find('"').unwrap() + 1
        } else {
            start + out[start..].find([',', '}']).unwrap()
        };
        out.replace_range(start..end, "_");
    }
    out
}

pub fn duration(line: &Value, key: &str) -> Duration {
    Duration::from_nanos(
        line[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {line}")),
    )
}
