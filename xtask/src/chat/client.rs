//! A chat client on one keep-alive connection (std `TcpStream`, HTTP/1.1), timing each
//! exchange at its socket: just before the request is written, just after, and the reads that
//! brought the first body byte, the first line of model output and the last byte. It classifies
//! every exchange, so that a caller can count exactly what a server-side observer should have
//! seen.

use std::{
    fmt,
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use super::response::Response;

/// The model every request names (one `observer sim` serves by default).
pub const MODEL: &str = "llama3.2:1b";

/// The inference APIs the client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `POST /api/chat`: NDJSON when streamed.
    Chat,
    /// `POST /api/generate`: NDJSON when streamed.
    Generate,
    /// `POST /v1/chat/completions`: server-sent events when streamed.
    OpenAiChat,
}

impl Api {
    pub fn route(self) -> &'static str {
        match self {
            Api::Chat => "/api/chat",
            Api::Generate => "/api/generate",
            Api::OpenAiChat => "/v1/chat/completions",
        }
    }
}

/// One inference request.
#[derive(Clone, Debug)]
pub struct ChatRequest {
    pub api: Api,
    pub stream: bool,
    /// The `X-Sim-Fault` header for `observer sim` (its faults, or this request's timing).
    pub sim: Option<String>,
    /// Varies the prompt (and so the request's length) from one request to the next.
    pub prompt: String,
}

impl ChatRequest {
    pub fn new(api: Api, stream: bool) -> ChatRequest {
        ChatRequest {
            api,
            stream,
            sim: None,
            prompt: "Why is the sky blue?".to_owned(),
        }
    }

    pub fn with_sim(mut self, header: impl Into<String>) -> ChatRequest {
        self.sim = Some(header.into());
        self
    }

    /// The request's bytes, head and body, ready for one write.
    pub fn to_bytes(&self) -> Vec<u8> {
        let prompt = self.prompt.replace(['"', '\\'], "");
        let body = match self.api {
            Api::Generate => format!(
                r#"{{"model":"{MODEL}","prompt":"{prompt}","stream":{}}}"#,
                self.stream
            ),
            Api::Chat | Api::OpenAiChat => format!(
                r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"{prompt}"}}],"stream":{}}}"#,
                self.stream
            ),
        };
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: xtask-chat\r\n\
             Content-Type: application/json\r\nAccept: */*\r\nContent-Length: {}\r\n",
            self.api.route(),
            body.len()
        );
        if let Some(sim) = &self.sim {
            head += &format!("X-Sim-Fault: {sim}\r\n");
        }
        head += "\r\n";
        [head.into_bytes(), body.into_bytes()].concat()
    }
}

/// How an exchange ended, from the client's side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The whole response arrived.
    Complete,
    /// No connection: refused, or the connect timed out. The server saw no request.
    Refused,
    /// The request could not be written (the connection was already closed or reset).
    Unsent,
    /// The request was written; the connection closed or reset before any response byte.
    NoResponse,
    /// The response began and the connection closed or reset before its end.
    Cut,
    /// Nothing more arrived for the read timeout; the client gave up and closed.
    TimedOut,
    /// The bytes were not the HTTP response the client expected.
    Malformed(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Complete => f.write_str("complete"),
            Outcome::Refused => f.write_str("refused"),
            Outcome::Unsent => f.write_str("unsent"),
            Outcome::NoResponse => f.write_str("no response"),
            Outcome::Cut => f.write_str("cut"),
            Outcome::TimedOut => f.write_str("timed out"),
            Outcome::Malformed(why) => write!(f, "malformed ({why})"),
        }
    }
}

/// One request and its response as the client's socket saw them.
#[derive(Debug)]
pub struct Exchange {
    pub outcome: Outcome,
    /// The status, once the response head arrived (so also for a [`Outcome::Cut`]).
    pub status: Option<u16>,
    /// Whether the request went on a connection that had carried an earlier exchange.
    pub reused: bool,
    /// Just before the request's first byte was written.
    pub sent: Instant,
    /// Just after its last byte was written.
    pub written: Option<Instant>,
    pub response: Response<Instant>,
}

impl Exchange {
    /// Request first byte to response last byte, in seconds.
    pub fn duration(&self) -> Option<f64> {
        Some(self.response.end?.duration_since(self.sent).as_secs_f64())
    }

    /// Request last byte to the first body bytes carrying model output
    /// (docs/DESIGN.md#engine-time-to-first-token), in seconds.
    pub fn time_to_first_chunk(&self) -> Option<f64> {
        let first = self.response.first_output()?;
        Some(first.duration_since(self.written?).as_secs_f64())
    }
}

/// A keep-alive connection to one server, opened on first use and again after a close.
pub struct ChatClient {
    addr: SocketAddr,
    timeout: Duration,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl ChatClient {
    /// `timeout` bounds the connect and each read.
    pub fn new(addr: SocketAddr, timeout: Duration) -> ChatClient {
        ChatClient {
            addr,
            timeout,
            stream: None,
            buf: vec![0; 64 * 1024],
        }
    }

    /// Sends `request` and reads its whole response. Never fails: what went wrong is the
    /// exchange's [`Outcome`]. The connection stays open only after a complete response that
    /// allows it.
    pub fn send(&mut self, request: &ChatRequest) -> Exchange {
        let bytes = request.to_bytes();
        if self.stream.as_ref().is_some_and(|s| !is_open(s)) {
            self.stream = None;
        }
        let reused = self.stream.is_some();
        let mut exchange = Exchange {
            outcome: Outcome::Complete,
            status: None,
            reused,
            sent: Instant::now(),
            written: None,
            response: Response::new(false),
        };
        if self.stream.is_none() {
            match self.connect() {
                Ok(stream) => self.stream = Some(stream),
                Err(_) => {
                    exchange.outcome = Outcome::Refused;
                    return exchange;
                }
            }
        }
        let stream = self.stream.as_mut().expect("connected above");
        exchange.sent = Instant::now();
        if stream.write_all(&bytes).is_err() {
            exchange.outcome = Outcome::Unsent;
            self.stream = None;
            return exchange;
        }
        exchange.written = Some(Instant::now());
        exchange.outcome = read_response(stream, &mut self.buf, &mut exchange.response);
        exchange.status = exchange.response.status;
        if exchange.outcome != Outcome::Complete || !exchange.response.keeps_alive() {
            self.stream = None;
        }
        exchange
    }

    fn connect(&self) -> std::io::Result<TcpStream> {
        let stream = TcpStream::connect_timeout(&self.addr, self.timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        Ok(stream)
    }
}

/// Whether an idle keep-alive connection is still open: no end of stream (nor stray bytes)
/// waiting to be read. Clients check this before reusing a connection (Go's `net/http`,
/// urllib3), which leaves only a narrow race with a server closing it meanwhile.
fn is_open(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let open = matches!(stream.peek(&mut [0]), Err(e) if e.kind() == ErrorKind::WouldBlock);
    stream.set_nonblocking(false).is_ok() && open
}

/// Reads until `response` is complete, timing each read as it returns.
fn read_response(
    stream: &mut TcpStream,
    buf: &mut [u8],
    response: &mut Response<Instant>,
) -> Outcome {
    loop {
        let read = stream.read(buf);
        let at = Instant::now();
        let n = match read {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Outcome::TimedOut;
            }
            Err(_) => 0,
        };
        if n == 0 {
            response.closed(at);
            return if response.is_complete() {
                Outcome::Complete
            } else if response.first_byte.is_none() {
                Outcome::NoResponse
            } else {
                Outcome::Cut
            };
        }
        match response.feed(&buf[..n], at) {
            Ok(used) if used < n => {
                return Outcome::Malformed(format!("{} bytes after the response", n - used));
            }
            Ok(_) if response.is_complete() => return Outcome::Complete,
            Ok(_) => {}
            Err(e) => return Outcome::Malformed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Read as _, net::TcpListener, thread};

    use super::*;

    /// A one-connection server answering each request with the next of `responses`, split
    /// in two writes, then closing; joining its thread waits until its listener is closed too.
    fn serve(responses: Vec<Vec<u8>>) -> (SocketAddr, thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0; 4096];
            for response in responses {
                let mut request = Vec::new();
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = conn.read(&mut buf).unwrap();
                    request.extend_from_slice(&buf[..n]);
                }
                let half = response.len() / 2;
                conn.write_all(&response[..half]).unwrap();
                thread::sleep(Duration::from_millis(5));
                conn.write_all(&response[half..]).unwrap();
            }
        });
        (addr, server)
    }

    #[test]
    fn keeps_the_connection_and_classifies_a_cut_stream() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\
                   Transfer-Encoding: chunked\r\n\r\n\
                   11\r\n{\"response\":\"a\"}\n\r\n0\r\n\r\n"
            .to_vec();
        let cut = ok[..ok.len() - 5].to_vec();
        let (addr, server) = serve(vec![ok, cut]);
        let mut client = ChatClient::new(addr, Duration::from_secs(5));
        let request = ChatRequest::new(Api::Generate, true);
        let first = client.send(&request);
        assert_eq!(
            (first.outcome.clone(), first.status, first.reused),
            (Outcome::Complete, Some(200), false)
        );
        assert_eq!(first.response.content_lines, 1);
        let (d, t) = (
            first.duration().unwrap(),
            first.time_to_first_chunk().unwrap(),
        );
        assert!(
            d >= 0.005 && t > 0.0 && t <= d,
            "duration {d}, first chunk {t}"
        );
        assert!(client.stream.is_some());
        let second = client.send(&request);
        assert_eq!(
            (second.outcome, second.status, second.reused),
            (Outcome::Cut, Some(200), true)
        );
        assert!(client.stream.is_none());
        // Once the server is gone (its listener closed), a new connection is refused.
        server.join().unwrap();
        let third = client.send(&request);
        assert_eq!(third.outcome, Outcome::Refused);
    }

    #[test]
    fn an_idle_connection_the_server_closed_is_not_reused() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_vec();
        let (addr, server) = serve(vec![ok]);
        let mut client = ChatClient::new(addr, Duration::from_secs(5));
        let request = ChatRequest::new(Api::Chat, false);
        assert_eq!(client.send(&request).outcome, Outcome::Complete);
        // The server closes after its one response; wait until the close has arrived.
        let stream = client.stream.as_ref().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_open(stream) {
            assert!(Instant::now() < deadline, "the server never closed");
            thread::sleep(Duration::from_millis(5));
        }
        // Not written into the closed connection: a new one is tried (and refused, once the
        // listener is closed too).
        server.join().unwrap();
        let second = client.send(&request);
        assert_eq!((second.outcome, second.reused), (Outcome::Refused, false));
    }

    #[test]
    fn a_close_before_any_byte_is_no_response() {
        let (addr, _server) = serve(vec![]);
        let mut client = ChatClient::new(addr, Duration::from_secs(5));
        let e = client.send(&ChatRequest::new(Api::Chat, false));
        assert!(
            matches!(e.outcome, Outcome::NoResponse | Outcome::Unsent),
            "{:?}",
            e.outcome
        );
        assert_eq!(e.status, None);
    }

    #[test]
    fn requests_carry_the_fault_header_and_an_exact_length() {
        let bytes = ChatRequest::new(Api::OpenAiChat, true)
            .with_sim("status=500")
            .to_bytes();
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"));
        assert!(head.contains("\r\nX-Sim-Fault: status=500"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }
}
