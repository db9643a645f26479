//! Writing one response the way Go's net/http frames what a gin handler writes.
//!
//! - Header order: the handler's headers sorted by name (`Allow`, `Content-Type`), then `Date`,
//!   `Content-Length`, `Connection`, `Transfer-Encoding`, as `chunkWriter.writeHeader` does.
//! - A handler that never flushes ([`ResponseWriter::send`]) gets `Content-Length` when its body
//!   fits Go's 2048-byte buffer, otherwise the whole body as one chunk and the last chunk.
//! - A handler that flushes ([`ResponseWriter::chunk`]): nothing leaves until the first flush,
//!   which carries the head and the first chunk in one write; each later flush is one chunk.
//!   An HTTP/1.0 client gets the raw bytes and a close instead.
//!
//! It also applies the transport faults of a request's [`FaultPlan`]: a slow head and a reset.

use std::io;
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::chunked::{LAST_CHUNK, encode_chunk};
use super::faults::FaultPlan;
use super::request::Request;
use crate::wallclock::http_date;

/// Go's `bufferBeforeChunkingSize`: a body up to this size, written without a flush, is sent
/// with a Content-Length.
pub const GO_BUFFER_BEFORE_CHUNKING: usize = 2048;

/// Why a response stopped early.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The fault plan asked for a reset; the caller must drop the connection now.
    #[error("connection reset on purpose (fault injection)")]
    ResetInjected,
    #[error("client went away: {0}")]
    Io(#[from] io::Error),
}

impl WriteError {
    /// The client closed the connection while the response was being prepared.
    pub fn client_gone() -> Self {
        Self::Io(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "client closed the connection",
        ))
    }
}

/// Go's `http.StatusText`, for the codes the simulator can send.
pub fn status_text(code: u16) -> Option<&'static str> {
    Some(match code {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Request Entity Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        507 => "Insufficient Storage",
        _ => return None,
    })
}

/// How the body after a head is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(usize),
    Chunked,
    /// HTTP/1.0 stream: the close ends it.
    UntilClose,
    /// HEAD of a body too large to have been measured.
    Unknown,
}

/// Builds a response head exactly as Go writes it. `headers` are the handler's own.
pub fn head_bytes(
    http11: bool,
    status: u16,
    headers: &[(&str, String)],
    framing: Framing,
    close: bool,
    date: SystemTime,
) -> Vec<u8> {
    let proto = if http11 { "HTTP/1.1" } else { "HTTP/1.0" };
    let text = status_text(status).map_or_else(|| format!("status code {status}"), str::to_owned);
    let mut head = format!("{proto} {status} {text}\r\n");
    // A closing response drops the handler's own Connection header for `close`.
    let mut sorted: Vec<&(&str, String)> = headers
        .iter()
        .filter(|(name, _)| !(close && name.eq_ignore_ascii_case("Connection")))
        .collect();
    sorted.sort_by_key(|(name, _)| *name);
    for (name, value) in sorted {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Date: {}\r\n", http_date(date)));
    if let Framing::Length(len) = framing {
        head.push_str(&format!("Content-Length: {len}\r\n"));
    }
    if close && http11 {
        head.push_str("Connection: close\r\n");
    }
    if framing == Framing::Chunked {
        head.push_str("Transfer-Encoding: chunked\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// A streamed response whose head has not gone out yet.
struct PendingHead {
    status: u16,
    headers: Vec<(&'static str, String)>,
}

/// Writes the response to one request on its connection.
pub struct ResponseWriter<'s> {
    stream: &'s mut TcpStream,
    http11: bool,
    head_only: bool,
    close: bool,
    slow_head: Option<Duration>,
    reset_after: Option<u32>,
    pending: Option<PendingHead>,
    chunks: u32,
}

impl<'s> ResponseWriter<'s> {
    pub fn new(stream: &'s mut TcpStream, request: &Request, plan: &FaultPlan) -> Self {
        Self {
            stream,
            http11: request.http11,
            head_only: request.is_head(),
            close: request.wants_close(),
            slow_head: plan.slow_head,
            reset_after: plan.reset_after,
            pending: None,
            chunks: 0,
        }
    }

    /// Resolves when the client has closed its end of the connection, as Go's background read
    /// sees it (EOF or an error) and cancels the request's context. Bytes of a pipelined next
    /// request mean the client is still there: then it never resolves.
    pub async fn client_gone(&self) {
        let mut byte = [0u8; 1];
        if let Ok(n) = self.stream.peek(&mut byte).await
            && n > 0
        {
            std::future::pending::<()>().await;
        }
    }

    /// Whether the connection must close after this response.
    pub fn must_close(&self) -> bool {
        self.close
    }

    /// A handler that wrote `body` and returned without flushing (gin's `c.JSON`, `c.String`).
    pub async fn send(
        &mut self,
        status: u16,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> Result<(), WriteError> {
        if self.reset_after.is_some() {
            // A non-streamed response has no chunk boundary to stop at: the reset comes first.
            return Err(self.reset());
        }
        let fits = body.len() <= GO_BUFFER_BEFORE_CHUNKING;
        let framing = match (self.head_only, fits, self.http11) {
            (_, true, _) => Framing::Length(body.len()),
            (true, false, _) => Framing::Unknown,
            (false, false, true) => Framing::Chunked,
            (false, false, false) => {
                self.close = true;
                Framing::UntilClose
            }
        };
        let mut wire = head_bytes(
            self.http11,
            status,
            headers,
            framing,
            self.close,
            SystemTime::now(),
        );
        let body_wire = match framing {
            _ if self.head_only => Vec::new(),
            Framing::Chunked => [encode_chunk(body), LAST_CHUNK.to_vec()].concat(),
            _ => body.to_vec(),
        };
        if self.slow_head.is_some() {
            self.dribble_head(&wire).await?;
            self.stream.write_all(&body_wire).await?;
        } else {
            wire.extend_from_slice(&body_wire);
            self.stream.write_all(&wire).await?;
        }
        Ok(())
    }

    /// Starts a response whose body will be flushed piece by piece; nothing is written yet.
    pub fn begin_stream(&mut self, status: u16, content_type: &'static str) {
        self.begin_stream_with(status, vec![("Content-Type", content_type.to_owned())]);
    }

    /// Like [`Self::begin_stream`], with all of the handler's headers.
    pub fn begin_stream_with(&mut self, status: u16, headers: Vec<(&'static str, String)>) {
        self.pending = Some(PendingHead { status, headers });
    }

    /// One flushed write of a streamed body (gin's `c.Stream` step followed by `Flush`).
    pub async fn chunk(&mut self, data: &[u8]) -> Result<(), WriteError> {
        if self.reset_after.is_some_and(|n| self.chunks >= n) {
            return Err(self.reset());
        }
        let body_wire = if self.http11 {
            encode_chunk(data)
        } else {
            data.to_vec()
        };
        let mut wire = Vec::new();
        if let Some(head) = self.pending.take() {
            let framing = if self.http11 {
                Framing::Chunked
            } else {
                self.close = true;
                Framing::UntilClose
            };
            wire = head_bytes(
                self.http11,
                head.status,
                &head.headers,
                framing,
                self.close,
                SystemTime::now(),
            );
            if self.slow_head.is_some() {
                self.dribble_head(&wire).await?;
                wire.clear();
            }
        }
        if !self.head_only {
            wire.extend_from_slice(&body_wire);
        }
        self.stream.write_all(&wire).await?;
        self.chunks += 1;
        Ok(())
    }

    /// The handler returned after streaming: the last chunk, or for an empty stream the head
    /// with `Content-Length: 0` (Go had nothing buffered when the handler finished).
    pub async fn finish(&mut self) -> Result<(), WriteError> {
        if self.reset_after.is_some() {
            // Fewer chunks than the reset point: the body still never completes.
            return Err(self.reset());
        }
        if let Some(head) = self.pending.take() {
            return self.send(head.status, &head.headers, b"").await;
        }
        if self.http11 && !self.head_only {
            self.stream.write_all(LAST_CHUNK).await?;
        }
        Ok(())
    }

    /// SO_LINGER 0: the close that follows sends RST instead of FIN.
    fn reset(&mut self) -> WriteError {
        if let Err(err) = self.stream.set_zero_linger() {
            return WriteError::Io(err);
        }
        WriteError::ResetInjected
    }

    /// Sends the head a line at a time spread over the slow-head delay, so the first byte and
    /// the end of the head both come late.
    async fn dribble_head(&mut self, head: &[u8]) -> Result<(), WriteError> {
        let delay = self.slow_head.unwrap_or_default();
        let lines: Vec<&[u8]> = head.split_inclusive(|&b| b == b'\n').collect();
        let pause = delay / u32::try_from(lines.len()).unwrap_or(1).max(1);
        for line in lines {
            tokio::time::sleep(pause).await;
            self.stream.write_all(line).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn head_orders_headers_like_go() {
        let date = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let headers = [
            ("Content-Type", "text/plain".to_owned()),
            ("Allow", "HEAD, GET".to_owned()),
        ];
        assert_eq!(
            text(head_bytes(
                true,
                405,
                &headers,
                Framing::Length(22),
                true,
                date
            )),
            "HTTP/1.1 405 Method Not Allowed\r\nAllow: HEAD, GET\r\nContent-Type: text/plain\r\n\
             Date: Tue, 14 Nov 2023 22:13:20 GMT\r\nContent-Length: 22\r\nConnection: close\r\n\r\n"
        );
        let ndjson = [("Content-Type", "application/x-ndjson".to_owned())];
        assert_eq!(
            text(head_bytes(
                true,
                200,
                &ndjson,
                Framing::Chunked,
                false,
                date
            )),
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\
             Date: Tue, 14 Nov 2023 22:13:20 GMT\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn http10_heads_have_no_connection_header_and_unknown_codes_get_go_text() {
        let date = UNIX_EPOCH;
        assert_eq!(
            text(head_bytes(false, 499, &[], Framing::UntilClose, true, date)),
            "HTTP/1.0 499 status code 499\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\r\n"
        );
    }
}
