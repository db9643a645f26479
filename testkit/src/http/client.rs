//! The blocking side of the client (std `TcpStream`): one request on a fresh connection
//! ([`get`]), one exchange on a connection the caller holds ([`exchange`]), and a keep-alive
//! [`Client`] that times each exchange at its socket (just before the request is written, just
//! after, and the reads that brought the first body byte, the first line of model output and
//! the last byte) and classifies how it ended, so that a caller can count exactly what a
//! server-side observer should have seen.

use std::{
    fmt,
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::Response;

/// How long [`get`] waits to connect, and for each read.
const GET_CONNECT: Duration = Duration::from_secs(2);
const GET_READ: Duration = Duration::from_secs(10);

/// `GET path` (HTTP/1.0) on a fresh connection to `addr`: the status and the body (as text,
/// lossily). An error when nothing answers or the response is cut or malformed.
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, GET_CONNECT)?;
    stream.set_read_timeout(Some(GET_READ))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let response = exchange_with(&mut stream, request.as_bytes(), true)?;
    let status = response.status.context("no status")?;
    Ok((status, String::from_utf8_lossy(&response.body).into_owned()))
}

/// `GET path` over HTTP/1.1, for a keep-alive connection.
pub fn get_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: testkit\r\n\r\n").into_bytes()
}

/// Writes `request` on `stream` and reads its whole response (the body not kept), leaving the
/// connection as the response leaves it. An error when the connection ends first, or on a
/// malformed response.
pub fn exchange(stream: &mut TcpStream, request: &[u8]) -> anyhow::Result<Response<Instant>> {
    exchange_with(stream, request, false)
}

fn exchange_with(
    stream: &mut TcpStream,
    request: &[u8],
    keep_body: bool,
) -> anyhow::Result<Response<Instant>> {
    stream.write_all(request)?;
    let mut response = Response::new(request.starts_with(b"HEAD "));
    if keep_body {
        response = response.keeping_body();
    }
    let mut buf = vec![0; 16 * 1024];
    match read_response(stream, &mut buf, &mut response) {
        Outcome::Complete => Ok(response),
        Outcome::Malformed(why) => bail!("a malformed response: {why}"),
        other => bail!("no whole response: {other}"),
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
pub struct Client {
    addr: SocketAddr,
    timeout: Duration,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Client {
    /// `timeout` bounds the connect and each read.
    pub fn new(addr: SocketAddr, timeout: Duration) -> Client {
        Client {
            addr,
            timeout,
            stream: None,
            buf: vec![0; 64 * 1024],
        }
    }

    /// Sends `request` (head and body, one write) and reads its whole response. Never fails:
    /// what went wrong is the exchange's [`Outcome`]. The connection stays open only after a
    /// complete response that allows it.
    pub fn send(&mut self, request: &[u8]) -> Exchange {
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
            response: Response::new(request.starts_with(b"HEAD ")),
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
        if stream.write_all(request).is_err() {
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
    use std::{net::TcpListener, thread};

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

    const REQUEST: &[u8] = b"POST /api/generate HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}";

    #[test]
    fn keeps_the_connection_and_classifies_a_cut_stream() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\
                   Transfer-Encoding: chunked\r\n\r\n\
                   11\r\n{\"response\":\"a\"}\n\r\n0\r\n\r\n"
            .to_vec();
        let cut = ok[..ok.len() - 5].to_vec();
        let (addr, server) = serve(vec![ok, cut]);
        let mut client = Client::new(addr, Duration::from_secs(5));
        let first = client.send(REQUEST);
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
        let second = client.send(REQUEST);
        assert_eq!(
            (second.outcome, second.status, second.reused),
            (Outcome::Cut, Some(200), true)
        );
        assert!(client.stream.is_none());
        // Once the server is gone (its listener closed), a new connection is refused.
        server.join().unwrap();
        let third = client.send(REQUEST);
        assert_eq!(third.outcome, Outcome::Refused);
    }

    #[test]
    fn an_idle_connection_the_server_closed_is_not_reused() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_vec();
        let (addr, server) = serve(vec![ok]);
        let mut client = Client::new(addr, Duration::from_secs(5));
        assert_eq!(client.send(REQUEST).outcome, Outcome::Complete);
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
        let second = client.send(REQUEST);
        assert_eq!((second.outcome, second.reused), (Outcome::Refused, false));
    }

    #[test]
    fn a_close_before_any_byte_is_no_response() {
        let (addr, _server) = serve(vec![]);
        let mut client = Client::new(addr, Duration::from_secs(5));
        let e = client.send(REQUEST);
        assert!(
            matches!(e.outcome, Outcome::NoResponse | Outcome::Unsent),
            "{:?}",
            e.outcome
        );
        assert_eq!(e.status, None);
    }

    #[test]
    fn get_and_exchange_read_whole_responses() {
        let (addr, server) = serve(vec![
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello".to_vec(),
        ]);
        // The server sends its HTTP/1.0 body and closes: the close ends the body.
        let got = thread::spawn(move || get(addr, "/x").unwrap());
        server.join().unwrap();
        assert_eq!(got.join().unwrap(), (200, "hello".to_owned()));

        let (addr, server) = serve(vec![
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nabc".to_vec(),
            b"HTTP/1.1 200 OK\r\nContent-Len".to_vec(),
        ]);
        let mut stream = TcpStream::connect(addr).unwrap();
        let r = exchange(&mut stream, &get_request("/a")).unwrap();
        assert_eq!((r.status, r.keeps_alive()), (Some(404), true));
        let err = exchange(&mut stream, &get_request("/b")).unwrap_err();
        assert!(err.to_string().contains("no whole response"), "{err}");
        server.join().unwrap();
        assert!(get(addr, "/").is_err(), "nothing listens any more");
    }
}
