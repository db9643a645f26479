//! The async side of the client (tokio): one connection whose bytes the caller may also read
//! and write by hand. The same reader as everywhere ([`Response`]) frames what comes; tests
//! see heads, bodies, each chunk, and how the connection ended (the last chunk, an EOF, a
//! reset), byte for byte, which a high-level client would hide. Every read is bounded by the
//! connection's wait: a server silent for longer fails the test.

use std::{io::ErrorKind, net::SocketAddr, os::fd::AsRawFd as _, time::Duration};

use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{Framing, Response};
use crate::ledger::Record;

/// The wait of a connection opened with [`Conn::connect`].
pub const WAIT: Duration = Duration::from_secs(5);

/// How a response body (or a connection) ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// The last chunk (or all of a Content-Length body) arrived.
    Complete,
    /// The server closed: the end of an HTTP/1.0 body, or a truncated one.
    Eof,
    Reset,
    /// Another error ended the reading.
    Failed(ErrorKind),
}

/// A response as the tests check it.
#[derive(Debug)]
pub struct Reply {
    /// Status line and headers, each line ended by CRLF, the Date value replaced by `<date>`.
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

/// One client connection.
pub struct Conn {
    pub stream: TcpStream,
    /// Bytes read and not yet taken by a response.
    pub buf: Vec<u8>,
    /// The server ended the connection (EOF or an error).
    pub ended: bool,
    /// The longest one read may take.
    wait: Duration,
}

impl Conn {
    /// Connects to `addr`; reads wait at most [`WAIT`].
    pub async fn connect(addr: SocketAddr) -> Conn {
        Conn::connect_waiting(addr, WAIT).await
    }

    /// Connects to `addr` (within `wait`); reads wait at most `wait`.
    pub async fn connect_waiting(addr: SocketAddr, wait: Duration) -> Conn {
        let stream = tokio::time::timeout(wait, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connecting to {addr} took over {wait:?}"))
            .unwrap_or_else(|err| panic!("connecting to {addr}: {err}"));
        Conn {
            stream,
            buf: Vec::new(),
            ended: false,
            wait,
        }
    }

    /// Writes all of `bytes`; fails the test if it cannot.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes).await.unwrap();
    }

    /// Writes all of `bytes`.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads more bytes into [`Conn::buf`]: `Ok(0)` at EOF. Marks the connection ended at EOF or
    /// on an error.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 16384];
        let read = tokio::time::timeout(self.wait, self.stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no byte from the server for {:?}; buffered: {:?}",
                    self.wait,
                    self.text()
                )
            });
        match read {
            Ok(0) | Err(_) => self.ended = true,
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
        }
        read
    }

    /// Fills until `want` bytes are buffered; the ending if the stream ends first.
    pub async fn fill_to(&mut self, want: usize) -> Option<Ending> {
        while self.buf.len() < want {
            match self.fill().await {
                Ok(0) => return Some(Ending::Eof),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Some(Ending::Reset),
                Err(e) => return Some(Ending::Failed(e.kind())),
            }
        }
        None
    }

    /// True when the server closed the connection (EOF or reset) and sent nothing more.
    pub async fn closed(&mut self) -> bool {
        self.fill_to(self.buf.len() + 1).await.is_some() && self.buf.is_empty()
    }

    /// Reads a response head (interim 1xx ones skipped); the response, ready for its body.
    /// The ending when the connection ends first. A head that is not HTTP fails the test.
    pub async fn response_head(&mut self, head_request: bool) -> Result<Response<()>, Ending> {
        let mut response = Response::new(head_request).keeping_body();
        loop {
            let used = response
                .feed_head(&self.buf, ())
                .unwrap_or_else(|err| panic!("{err:#}"));
            self.buf.drain(..used);
            if response.has_head() {
                return Ok(response);
            }
            if let Some(ending) = self.fill_to(self.buf.len() + 1).await {
                return Err(ending);
            }
        }
    }

    /// Reads `response`'s body to its end: [`Ending::Complete`], else how the connection
    /// ended (also for a body that the close ends). A malformed body fails the test.
    pub async fn response_body(&mut self, response: &mut Response<()>) -> Ending {
        loop {
            if response.is_complete() {
                return Ending::Complete;
            }
            let used = response
                .feed(&self.buf, ())
                .unwrap_or_else(|err| panic!("a malformed body ({err:#}): {:?}", self.text()));
            self.buf.drain(..used);
            if response.is_complete() {
                return Ending::Complete;
            }
            if let Some(ending) = self.fill_to(self.buf.len() + 1).await {
                response.closed(());
                return ending;
            }
        }
    }

    /// Reads a head: its text (as [`Reply::head`]), its length, its `Content-Length`, and
    /// whether the body is chunked. Fails the test when the connection ends first.
    pub async fn head(&mut self) -> (String, usize, Option<usize>, bool) {
        let response = match self.response_head(false).await {
            Ok(response) => response,
            Err(ending) => panic!("closed ({ending:?}) before a whole head: {:?}", self.buf),
        };
        let length = response.content_length().map(|n| n as usize);
        let chunked = response.framing() == Framing::Chunked;
        (
            head_text(response.head()),
            response.head().len(),
            length,
            chunked,
        )
    }

    pub async fn reply(&mut self) -> Reply {
        self.reply_framed(false).await
    }

    pub async fn reply_to_head_request(&mut self) -> Reply {
        self.reply_framed(true).await
    }

    /// One response (`head_request`: to a HEAD, so without a body). Fails the test when the
    /// connection ends before its head.
    pub async fn reply_framed(&mut self, head_request: bool) -> Reply {
        let mut response = match self.response_head(head_request).await {
            Ok(response) => response,
            Err(ending) => panic!("closed ({ending:?}) before a whole head: {:?}", self.buf),
        };
        let head = head_text(response.head());
        let ending = self.response_body(&mut response).await;
        Reply {
            head,
            body: response.body,
            chunks: response.chunks,
            ending,
        }
    }

    /// Reads a chunked body (its head already read) into `reply`: its data and each chunk.
    pub async fn chunks(&mut self, reply: &mut Reply) -> Ending {
        let mut response = Response::body_only(Framing::Chunked);
        let ending = self.response_body(&mut response).await;
        reply.body.extend_from_slice(&response.body);
        reply.chunks.extend(response.chunks);
        ending
    }

    /// Sends `request` and reads its response: how the exchange ended for the client. Never
    /// fails on how the server ends the connection.
    pub async fn exchange(&mut self, request: &[u8]) -> Record {
        if self.try_send(request).await.is_err() {
            return Record::NONE;
        }
        self.response().await
    }

    /// Reads one response: its head, then its body.
    pub async fn response(&mut self) -> Record {
        match self.response_head(false).await {
            Ok(head) => self.record(head).await,
            Err(_) => Record::NONE,
        }
    }

    /// Reads the body of `response` (its head read): how the exchange ended.
    pub async fn record(&mut self, mut response: Response<()>) -> Record {
        self.response_body(&mut response).await;
        Record {
            status: response.status,
            complete: response.is_complete(),
        }
    }

    /// Reads whatever the server sends until it ends the connection or `within` passes;
    /// every byte read.
    pub async fn read_until_closed(&mut self, within: Duration) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + within;
        while !self.ended && tokio::time::Instant::now() < deadline {
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0) | Err(_)) => self.ended = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => break,
            }
        }
        std::mem::take(&mut self.buf)
    }

    /// Ends the connection with a reset instead of a FIN (`SO_LINGER` 0, then close): the
    /// client vanishes as a crashed host's would.
    pub fn reset(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt reads `linger`, which outlives the call, on our own socket.
        let rc = unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
        drop(self);
    }

    /// The start of what is buffered, for failure messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf[..self.buf.len().min(300)]).into_owned()
    }
}

/// A head's lines joined by CRLF (one after each), the value of `Date` replaced by `<date>`
/// once checked to be an HTTP date.
fn head_text(head: &[u8]) -> String {
    let raw = String::from_utf8(head.to_vec()).unwrap();
    raw.lines()
        .map(|l| match l.strip_prefix("Date: ") {
            Some(date) => {
                assert!(date.len() == 29 && date.ends_with(" GMT"), "Date {date:?}");
                "Date: <date>".to_owned()
            }
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// A server writing `bytes` (in two writes) to its first connection, then closing it.
    async fn serve(bytes: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = conn.read(&mut request).await;
            let half = bytes.len() / 2;
            conn.write_all(&bytes[..half]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            conn.write_all(&bytes[half..]).await.unwrap();
        });
        addr
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn replies_keep_heads_chunks_and_endings() {
        runtime().block_on(async {
            let addr = serve(
                b"HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n\
                  2\r\nab\r\n1\r\nc\r\n0\r\n\r\nHTTP/1.0 200 OK\r\n\r\nrest",
            )
            .await;
            let mut conn = Conn::connect(addr).await;
            conn.send(b"GET / HTTP/1.1\r\n\r\n").await;
            let reply = conn.reply().await;
            assert_eq!(
                reply.head,
                "HTTP/1.1 200 OK\r\nDate: <date>\r\nTransfer-Encoding: chunked\r\n"
            );
            assert_eq!((reply.text(), reply.chunks.len()), ("abc".to_owned(), 2));
            assert_eq!(reply.ending, Ending::Complete);
            assert_eq!(reply.header("transfer-encoding"), Some("chunked"));
            // The next response is close-delimited: its ending is the close.
            let next = conn.reply().await;
            assert_eq!((next.body, next.ending), (b"rest".to_vec(), Ending::Eof));
            assert!(conn.closed().await);
        });
    }

    #[test]
    fn records_say_how_exchanges_ended() {
        runtime().block_on(async {
            let addr = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc").await;
            let mut conn = Conn::connect(addr).await;
            let record = conn.exchange(b"GET / HTTP/1.1\r\n\r\n").await;
            assert_eq!(
                record,
                Record {
                    status: Some(200),
                    complete: false
                }
            );
            let addr = serve(b"").await;
            let mut conn = Conn::connect(addr).await;
            assert_eq!(conn.exchange(b"GET / HTTP/1.1\r\n\r\n").await, Record::NONE);

            let addr =
                serve(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n").await;
            let mut conn = Conn::connect(addr).await;
            conn.send(b"GET / HTTP/1.1\r\n\r\n").await;
            let (head, len, length, chunked) = conn.head().await;
            assert_eq!((len, length, chunked), (head.len() + 2, None, true));
            let mut reply = Reply {
                head,
                body: Vec::new(),
                chunks: Vec::new(),
                ending: Ending::Complete,
            };
            assert_eq!(conn.chunks(&mut reply).await, Ending::Eof);
            assert_eq!(reply.chunks, [b"x".to_vec()]);
        });
    }
}
