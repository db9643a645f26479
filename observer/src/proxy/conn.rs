//! One client connection of the proxy: requests read one at a time, checked (size, readiness),
//! forwarded with their bodies to the connection's own upstream connection, and the response
//! relayed back as it arrives, every read written on at once. Pipelined requests wait in the
//! buffer and are taken in order.
//!
//! Owns the per-connection timeouts and the proxy's own answers. Every byte read or written
//! is handed to the [`Feed`] as it moves; nothing here counts or measures.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
    sync::watch,
    time::Instant,
};

use super::{
    feed::{Pair, Tap},
    reply::Reply,
    request::{self, Body, ChunkedBody, RequestHead},
};
use crate::base::{Direction, clock::monotonic_ns};
use crate::{
    engine::{
        ConnMeta,
        http::{BodyRule, Head, Kind, MessageParser, Sink},
    },
    probe::{Readiness, check::Upstream, state::Verdict},
};

/// Body bytes the readiness gate reads before deciding (the model is near the start).
const GATE_PEEK: usize = 64 * 1024;
/// How long a connection over `--max-conns` may take to send its request before its 503.
const REJECT_WAIT: Duration = Duration::from_secs(1);
/// Read size from the upstream: a streamed chunk is far smaller and goes on at once.
const RELAY_BUF: usize = 8 * 1024;
/// Relay buffers a worker keeps for its next exchanges.
const POOLED: usize = 256;

thread_local! {
    /// Relay buffers of this worker's exchanges that ended: an exchange takes one and gives it
    /// back, so an idle keep-alive connection holds none (1,000 idle connections would hold
    /// 8 MiB) and a busy one costs no allocation per request.
    static RELAY_BUFS: std::cell::RefCell<Vec<Box<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_relay_buf() -> Box<[u8]> {
    RELAY_BUFS
        .with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| vec![0u8; RELAY_BUF].into_boxed_slice())
}

fn give_back_relay_buf(buf: Box<[u8]>) {
    RELAY_BUFS.with_borrow_mut(|pool| {
        if pool.len() < POOLED {
            pool.push(buf);
        }
    });
}

/// What every connection shares.
#[derive(Debug)]
pub struct Settings {
    pub upstream: Upstream,
    pub head_timeout: Duration,
    pub idle_timeout: Duration,
    pub exchange_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_body_bytes: u64,
    pub forwarded_for: bool,
    /// The probe's verdicts when the readiness gate is on, and the `Retry-After` it answers.
    pub gate: Option<(Readiness, Duration)>,
}

/// How a connection ends.
enum Next {
    /// Take the next request.
    Continue,
    Close,
}

pub struct Connection {
    settings: Arc<Settings>,
    tap: Tap,
    pair: Pair,
    client: TcpStream,
    peer: SocketAddr,
    upstream: Option<TcpStream>,
    /// Client bytes read and not yet forwarded (the start of the next request).
    buf: BytesMut,
    /// Every deadline of the connection's waits.
    timer: Timer,
    draining: watch::Receiver<bool>,
}

impl Connection {
    pub fn new(
        settings: Arc<Settings>,
        tap: Tap,
        pair: Pair,
        client: TcpStream,
        peer: SocketAddr,
        draining: watch::Receiver<bool>,
    ) -> Connection {
        let _ = client.set_nodelay(true);
        Connection {
            settings,
            tap,
            pair,
            client,
            peer,
            upstream: None,
            buf: BytesMut::with_capacity(4096),
            timer: Timer::new(),
            draining,
        }
    }

    /// Serves the connection to its end; `reject` answers its first request with that reply
    /// instead (over `--max-conns`).
    pub async fn serve(mut self, reject: Option<Reply>) {
        self.tap.open(self.pair.client);
        let outcome = self.exchanges(reject).await;
        if let Err(err) = outcome {
            tracing::debug!(peer = %self.peer, "proxy connection ended: {err}");
        }
        if self.upstream.take().is_some() {
            self.tap.close(self.pair.upstream);
        }
        self.tap.close(self.pair.client);
        self.tap.finish();
    }

    async fn exchanges(&mut self, reject: Option<Reply>) -> std::io::Result<()> {
        if let Some(reply) = reject {
            return self.reject(reply).await;
        }
        loop {
            let Some(head) = self.read_head().await? else {
                return Ok(());
            };
            match self.exchange(head).await? {
                Next::Continue if !*self.draining.borrow() => {}
                _ => return Ok(()),
            }
        }
    }

    /// Waits for a request head: at most the idle timeout for its first byte, then the head
    /// timeout for the rest. None when the connection should close (EOF, idle, drain, or an
    /// answered bad head).
    async fn read_head(&mut self) -> std::io::Result<Option<RequestHead>> {
        if self.buf.is_empty() {
            let idle_until = Instant::now() + self.settings.idle_timeout;
            let mut draining = self.draining.clone();
            tokio::select! {
                read = self.read_more(idle_until) => {
                    // EOF or idle for too long.
                    if matches!(read?, None | Some(0)) {
                        return Ok(None);
                    }
                }
                _ = draining.wait_for(|d| *d) => return Ok(None),
            }
        }
        // The head's clock starts once a read left it incomplete (a whole head needs none).
        let mut head_deadline = None;
        loop {
            match request::parse(&self.buf) {
                Ok(Some(head)) => return Ok(Some(head)),
                Ok(None) => {}
                Err(err) => {
                    let status = err.status();
                    self.answer(Reply::new(status, err.to_string())).await?;
                    return Ok(None);
                }
            }
            let deadline =
                *head_deadline.get_or_insert_with(|| Instant::now() + self.settings.head_timeout);
            match self.read_more(deadline).await? {
                Some(0) => return Ok(None),
                Some(_) => {}
                None => {
                    let timeout = humantime::format_duration(self.settings.head_timeout);
                    let reply =
                        Reply::new(408, format!("request head not received within {timeout}"));
                    self.answer(reply).await?;
                    return Ok(None);
                }
            }
        }
    }

    /// A connection over the limit: its request, when one comes within [`REJECT_WAIT`], is
    /// answered with `reply` (and counted); a silent one gets `reply` anyway, uncounted, since
    /// there is no request to count it against.
    async fn reject(&mut self, reply: Reply) -> std::io::Result<()> {
        let deadline = Instant::now() + REJECT_WAIT;
        loop {
            if !matches!(request::parse(&self.buf), Ok(None)) {
                return self.answer(reply).await;
            }
            match self.read_more(deadline).await? {
                Some(0) => return Ok(()),
                Some(_) => {}
                None if self.buf.is_empty() => {
                    self.client.write_all(&reply.to_bytes()).await?;
                    let _ = self.client.shutdown().await;
                    return Ok(());
                }
                // Half a head: answering it completes an exchange the engine can count.
                None => return self.answer(reply).await,
            }
        }
    }

    /// Reads more of the client's bytes into the buffer: how many (0 at EOF), or None when
    /// `deadline` came first.
    async fn read_more(&mut self, deadline: Instant) -> std::io::Result<Option<usize>> {
        let read = read_client(&mut self.client, &mut self.buf, &self.tap, self.pair.client);
        match self.timer.until(deadline, read).await {
            Some(read) => read.map(Some),
            None => Ok(None),
        }
    }

    /// Writes one of the proxy's own responses and closes the connection.
    async fn answer(&mut self, reply: Reply) -> std::io::Result<()> {
        let bytes = Bytes::from(reply.to_bytes());
        self.client.write_all(&bytes).await?;
        self.tap.data(self.pair.client, Direction::Egress, &bytes);
        self.tap.flush();
        let _ = self.client.shutdown().await;
        Ok(())
    }

    /// One request and its response.
    async fn exchange(&mut self, head: RequestHead) -> std::io::Result<Next> {
        let started = Instant::now();
        let deadline = started + self.settings.exchange_timeout;
        if let Body::Length(n) = head.body
            && n > self.settings.max_body_bytes
        {
            let reply = Reply::new(
                413,
                format!(
                    "request body of {n} bytes is over the limit of {} (--max-body-bytes)",
                    self.settings.max_body_bytes
                ),
            );
            self.answer(reply).await?;
            return Ok(Next::Close);
        }
        if let Some(reply) = self.gate(&head, deadline).await? {
            self.answer(reply).await?;
            return Ok(Next::Close);
        }
        if self.upstream.is_none() {
            match self.connect().await {
                Ok(stream) => {
                    self.upstream = Some(stream);
                    self.tap.open(self.pair.upstream);
                }
                Err(message) => {
                    self.answer(Reply::new(502, message)).await?;
                    return Ok(Next::Close);
                }
            }
        }
        let head_bytes = self.buf.split_to(head.len).freeze();
        let head_bytes = if self.settings.forwarded_for {
            with_forwarded_for(&head_bytes, self.peer)
        } else {
            head_bytes
        };
        // A body already here goes in the same write as the head (one segment, one syscall).
        let (first_write, body) = match head.body {
            Body::Length(n) if !self.buf.is_empty() => {
                let take = (self.buf.len() as u64).min(n) as usize;
                let mut joined = BytesMut::with_capacity(head_bytes.len() + take);
                joined.extend_from_slice(&head_bytes);
                joined.extend_from_slice(&self.buf.split_to(take));
                let left = n - take as u64;
                let body = if left == 0 {
                    Body::None
                } else {
                    Body::Length(left)
                };
                (joined.freeze(), body)
            }
            body => (head_bytes, body),
        };
        let Some(upstream) = self.upstream.as_mut() else {
            return Ok(Next::Close);
        };
        let (mut ur, mut uw) = upstream.split();
        let (mut cr, mut cw) = self.client.split();
        let tap = &self.tap;
        let pair = self.pair;
        let buf = &mut self.buf;
        let mut relay_buf = take_relay_buf();
        let max_body_bytes = self.settings.max_body_bytes;
        let mut sent = 0u64;
        let mut relay = Relay::new(head.method == "HEAD", head.method == "CONNECT");
        let outcome = self
            .timer
            .until(deadline, async {
                write_upstream(&mut uw, tap, pair.upstream, &first_write).await?;
                let body = forward_body(&mut cr, &mut uw, buf, body, tap, pair, max_body_bytes);
                let response = relay.run(&mut ur, &mut cw, &mut relay_buf, tap, pair, &mut sent);
                let (body, response) = tokio::join!(body, response);
                body?;
                response
            })
            .await
            .ok_or(Elapsed);
        give_back_relay_buf(relay_buf);
        self.tap.flush();
        match outcome {
            Ok(Ok(Relayed::Complete)) if head.keep_alive => Ok(Next::Continue),
            Ok(Ok(Relayed::Complete)) | Ok(Ok(Relayed::EndedByClose)) => {
                let _ = self.client.shutdown().await;
                Ok(Next::Close)
            }
            Ok(Ok(Relayed::Upgraded)) => {
                self.tunnel().await;
                Ok(Next::Close)
            }
            Ok(Ok(Relayed::UpstreamClosed)) | Ok(Err(_)) => {
                // The upstream went away mid-response (or reset): cut the client short too, so
                // that it cannot take a partial response for a whole one.
                if sent == 0 {
                    let message = format!(
                        "{} closed the connection before answering",
                        self.settings.upstream
                    );
                    self.upstream = None;
                    self.tap.close(pair.upstream);
                    self.answer(Reply::new(502, message)).await?;
                } else {
                    reset(&self.client);
                }
                Ok(Next::Close)
            }
            Err(_) if sent == 0 => {
                let timeout = humantime::format_duration(self.settings.exchange_timeout);
                self.answer(Reply::new(
                    504,
                    format!("no response within {timeout} (--timeout)"),
                ))
                .await?;
                Ok(Next::Close)
            }
            Err(_) => {
                reset(&self.client);
                Ok(Next::Close)
            }
        }
    }

    /// The readiness gate: a request naming a model the probe says is not ready is answered
    /// 503 here, without touching the upstream.
    async fn gate(
        &mut self,
        head: &RequestHead,
        deadline: Instant,
    ) -> std::io::Result<Option<Reply>> {
        let settings = self.settings.clone();
        let Some((readiness, retry)) = &settings.gate else {
            return Ok(None);
        };
        if !head.names_a_model() || head.expect_continue || head.body == Body::None {
            return Ok(None);
        }
        let want = match head.body {
            Body::Length(n) => head.len + (n as usize).min(GATE_PEEK),
            _ => head.len + 1,
        };
        while self.buf.len() < want {
            if matches!(self.read_more(deadline).await?, None | Some(0)) {
                break;
            }
        }
        let Some(model) = request::model_of(&self.buf[head.len..]) else {
            return Ok(None);
        };
        if readiness.verdict(&model) != Some(Verdict::NotReady) {
            return Ok(None);
        }
        Ok(Some(
            Reply::new(
                503,
                format!(
                    "model {model:?} is not ready (the readiness probe fails; see /ready/model)"
                ),
            )
            .retry_after(*retry),
        ))
    }

    async fn connect(&self) -> Result<TcpStream, String> {
        let upstream = &self.settings.upstream;
        let timeout = self.settings.connect_timeout;
        let connect = TcpStream::connect((upstream.host(), upstream.port()));
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            Ok(Err(err)) => Err(format!("cannot connect to the upstream {upstream}: {err}")),
            Err(_) => Err(format!(
                "cannot connect to the upstream {upstream} within {}",
                humantime::format_duration(timeout)
            )),
        }
    }

    /// After a protocol upgrade: bytes both ways until both sides have closed, each fed to the
    /// engine as it is moved (it reads WebSocket frames and the calls made with them; other
    /// protocols it counts and leaves alone). A side that closes its half is half-closed on
    /// the other side, as `copy_bidirectional` does.
    async fn tunnel(&mut self) {
        let Some(upstream) = self.upstream.as_mut() else {
            return;
        };
        let (tap, pair) = (&self.tap, self.pair);
        let (mut ur, mut uw) = upstream.split();
        let (mut cr, mut cw) = self.client.split();
        if !self.buf.is_empty() {
            // Read (and fed as the client's) before the upgrade was answered.
            let early = self.buf.split().freeze();
            if write_upstream(&mut uw, tap, pair.upstream, &early)
                .await
                .is_err()
            {
                return;
            }
        }
        let (mut from_client, mut from_upstream) = (take_relay_buf(), take_relay_buf());
        // The two ways move at once: a write waiting for one peer to read never keeps the
        // other way from moving (both peers may write much before they read).
        tokio::join!(
            pump(
                &mut cr,
                &mut uw,
                &mut from_client,
                tap,
                [
                    (pair.client, Direction::Ingress),
                    (pair.upstream, Direction::Egress)
                ]
            ),
            pump(
                &mut ur,
                &mut cw,
                &mut from_upstream,
                tap,
                [
                    (pair.upstream, Direction::Ingress),
                    (pair.client, Direction::Egress)
                ]
            ),
        );
        give_back_relay_buf(from_client);
        give_back_relay_buf(from_upstream);
    }
}

/// One way of a tunnel, until its reader is done (closed, or an error on either side): each
/// read written on and fed, as read by the first end and as written by the second. The
/// writing side is then shut down for writes (a half-close passes on).
async fn pump(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    buf: &mut [u8],
    tap: &Tap,
    [(from_meta, from_dir), (to_meta, to_dir)]: [(ConnMeta, Direction); 2],
) {
    loop {
        let n = match from.read(buf).await {
            Ok(n) if n > 0 => n,
            _ => break,
        };
        let read_at = monotonic_ns();
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        tap.data_at(from_meta, from_dir, read_at, &buf[..n]);
        tap.data_at(to_meta, to_dir, monotonic_ns(), &buf[..n]);
        tap.flush();
    }
    let _ = to.shutdown().await;
}

/// Reads what the client sent next into `buf`, feeding it as the gateway's ingress.
async fn read_client(
    client: &mut (impl AsyncReadExt + Unpin),
    buf: &mut BytesMut,
    tap: &Tap,
    meta: ConnMeta,
) -> std::io::Result<usize> {
    let before = buf.len();
    if buf.capacity() - before < 1024 {
        buf.reserve(8192);
    }
    let n = client.read_buf(buf).await?;
    tap.data(meta, Direction::Ingress, &buf[before..]);
    Ok(n)
}

async fn write_upstream(
    upstream: &mut WriteHalf<'_>,
    tap: &Tap,
    meta: ConnMeta,
    bytes: &[u8],
) -> std::io::Result<()> {
    upstream.write_all(bytes).await?;
    tap.data(meta, Direction::Egress, bytes);
    Ok(())
}

/// Moves the request body to the upstream: what is already buffered, then what the client
/// still sends, up to the end its framing gives. Bytes after it stay in `buf`.
async fn forward_body(
    client: &mut ReadHalf<'_>,
    upstream: &mut WriteHalf<'_>,
    buf: &mut BytesMut,
    body: Body,
    tap: &Tap,
    pair: Pair,
    max_body_bytes: u64,
) -> std::io::Result<()> {
    let eof = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "client closed mid-body");
    match body {
        Body::None => Ok(()),
        Body::Length(mut left) => loop {
            let take = (buf.len() as u64).min(left) as usize;
            if take > 0 {
                write_upstream(upstream, tap, pair.upstream, &buf.split_to(take)).await?;
                left -= take as u64;
            }
            if left == 0 {
                return Ok(());
            }
            if read_client(client, buf, tap, pair.client).await? == 0 {
                return Err(eof());
            }
        },
        Body::Chunked => {
            let mut scanner = ChunkedBody::default();
            let mut forwarded = 0u64;
            loop {
                if !buf.is_empty() {
                    let found = scanner
                        .feed(buf)
                        .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidData, err))?;
                    let take = found.unwrap_or(buf.len());
                    forwarded += take as u64;
                    if forwarded > max_body_bytes {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "chunked request body over --max-body-bytes",
                        ));
                    }
                    write_upstream(upstream, tap, pair.upstream, &buf.split_to(take)).await?;
                    if found.is_some() {
                        return Ok(());
                    }
                }
                if read_client(client, buf, tap, pair.client).await? == 0 {
                    return Err(eof());
                }
            }
        }
    }
}

/// The exchange's deadline passed.
struct Elapsed;

/// One timer for all of a connection's deadlines. Arming a timer costs an insertion into the
/// runtime's timer wheel and its removal when the wait ends; a keep-alive connection waits
/// twice a request (idle, exchange) and sometimes three times (the head). This one is moved
/// only when a deadline comes before the armed one, or when it fires before the deadline of
/// the wait in progress; otherwise it stays armed across waits.
struct Timer {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// When it fires, or None when it has fired (or never was armed).
    armed: Option<Instant>,
}

impl Timer {
    fn new() -> Timer {
        Timer {
            sleep: Box::pin(tokio::time::sleep_until(Instant::now())),
            armed: None,
        }
    }

    /// `future`'s output, or None when `deadline` came first.
    async fn until<F: std::future::Future>(
        &mut self,
        deadline: Instant,
        future: F,
    ) -> Option<F::Output> {
        if self.armed.is_none_or(|armed| armed > deadline) {
            self.sleep.as_mut().reset(deadline);
            self.armed = Some(deadline);
        }
        let mut future = std::pin::pin!(future);
        loop {
            tokio::select! {
                biased;
                output = &mut future => return Some(output),
                () = self.sleep.as_mut() => {
                    self.armed = None;
                    if Instant::now() >= deadline {
                        return None;
                    }
                    // It was armed for an earlier deadline than this wait's.
                    self.sleep.as_mut().reset(deadline);
                    self.armed = Some(deadline);
                }
            }
        }
    }
}

/// How a response relay ended.
enum Relayed {
    Complete,
    /// A close-delimited body, ended by the upstream's close.
    EndedByClose,
    /// The upstream closed before the response was whole.
    UpstreamClosed,
    /// 101 or a CONNECT tunnel: no more HTTP on this connection.
    Upgraded,
}

/// Frames the response as it is relayed, to know where it ends.
struct Relay {
    parser: MessageParser,
    end: ResponseEnd,
}

impl Relay {
    fn new(head_request: bool, connect: bool) -> Relay {
        Relay {
            parser: MessageParser::new(Kind::Response),
            end: ResponseEnd {
                head_request,
                connect,
                final_status: None,
                ended: false,
                opaque: false,
            },
        }
    }

    async fn run(
        &mut self,
        upstream: &mut ReadHalf<'_>,
        client: &mut WriteHalf<'_>,
        buf: &mut [u8],
        tap: &Tap,
        pair: Pair,
        sent: &mut u64,
    ) -> std::io::Result<Relayed> {
        loop {
            let n = upstream.read(buf).await?;
            if n == 0 {
                self.parser.close(&mut self.end);
                return Ok(if self.end.ended {
                    Relayed::EndedByClose
                } else {
                    Relayed::UpstreamClosed
                });
            }
            // The client gets the bytes first; the bookkeeping follows.
            let read_at = monotonic_ns();
            let chunk = &buf[..n];
            client.write_all(chunk).await?;
            *sent += n as u64;
            let written_at = monotonic_ns();
            self.parser.segment(0, n as u64, chunk, &[], &mut self.end);
            tap.data_at(pair.upstream, Direction::Ingress, read_at, chunk);
            tap.data_at(pair.client, Direction::Egress, written_at, chunk);
            if self.end.opaque {
                return Ok(Relayed::Upgraded);
            }
            if self.end.ended {
                return Ok(Relayed::Complete);
            }
        }
    }
}

/// The end of the final response (interim 1xx responses pass through).
struct ResponseEnd {
    head_request: bool,
    connect: bool,
    final_status: Option<u16>,
    ended: bool,
    opaque: bool,
}

impl Sink for ResponseEnd {
    fn head(&mut self, head: &Head, _ts: u64) -> BodyRule {
        let status = head.status;
        if status == 101 || (self.connect && status / 100 == 2) {
            self.opaque = true;
            return BodyRule::Opaque;
        }
        if (100..200).contains(&status) {
            return BodyRule::None;
        }
        self.final_status = Some(status);
        if self.head_request || status == 204 || status == 304 {
            BodyRule::None
        } else {
            BodyRule::Framed
        }
    }

    fn body(&mut self, _bytes: &[u8], _ts: u64) {}

    fn body_gap(&mut self, _n: u64) {}

    fn end(&mut self, _ts: u64) {
        if self.final_status.is_some() {
            self.ended = true;
        }
    }

    fn error(&mut self, _reason: crate::engine::ErrorReason) {}
}

/// The head with `X-Forwarded-For: <client address>` added before its blank line.
fn with_forwarded_for(head: &[u8], peer: SocketAddr) -> Bytes {
    let blank = if head.ends_with(b"\r\n\r\n") { 2 } else { 1 };
    let (lines, end) = head.split_at(head.len() - blank);
    let mut out = Vec::with_capacity(head.len() + 64);
    out.extend_from_slice(lines);
    out.extend_from_slice(format!("X-Forwarded-For: {}\r\n", peer.ip()).as_bytes());
    out.extend_from_slice(end);
    Bytes::from(out)
}

/// Closes with a reset (SO_LINGER 0), so that the client sees an abort, not an end.
fn reset(client: &TcpStream) {
    let _ = client.set_zero_linger();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_timer_keeps_each_waits_own_deadline() {
        let ms = Duration::from_millis;
        let mut timer = Timer::new();
        let start = Instant::now();
        assert_eq!(
            timer.until(start + ms(30), std::future::ready(1)).await,
            Some(1)
        );
        // Armed for 30 ms: a wait until 300 ms outlives that firing.
        let slept = timer
            .until(start + ms(300), tokio::time::sleep(ms(80)))
            .await;
        assert_eq!(slept, Some(()));
        // A later deadline keeps the timer where it is; an earlier one moves it.
        let now = Instant::now();
        assert_eq!(
            timer.until(now + ms(60_000), std::future::ready(2)).await,
            Some(2)
        );
        let never = timer
            .until(now + ms(40), std::future::pending::<()>())
            .await;
        assert_eq!(never, None);
        let waited = now.elapsed();
        assert!(waited >= ms(40) && waited < ms(5_000), "{waited:?}");
        // After a deadline passed, the next wait gets its own.
        let now = Instant::now();
        let never = timer
            .until(now + ms(20), std::future::pending::<()>())
            .await;
        assert_eq!(never, None);
        assert!(now.elapsed() >= ms(20));
    }

    #[test]
    fn forwarded_for_goes_before_the_blank_line() {
        let peer: SocketAddr = "10.0.0.7:5555".parse().unwrap();
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            &with_forwarded_for(head, peer)[..],
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.7\r\n\r\n"
        );
        let bare = b"GET / HTTP/1.1\nHost: x\n\n";
        assert_eq!(
            &with_forwarded_for(bare, peer)[..],
            b"GET / HTTP/1.1\nHost: x\nX-Forwarded-For: 10.0.0.7\r\n\n"
        );
    }

    fn relay_ends(head_request: bool, bytes: &[u8]) -> (bool, bool) {
        let mut relay = Relay::new(head_request, false);
        relay
            .parser
            .segment(0, bytes.len() as u64, bytes, &[], &mut relay.end);
        (relay.end.ended, relay.end.opaque)
    }

    #[test]
    fn the_response_end_is_found_after_interim_responses() {
        let continue_then_ok =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(relay_ends(false, continue_then_ok), (true, false));
        assert_eq!(
            relay_ends(false, b"HTTP/1.1 100 Continue\r\n\r\n"),
            (false, false)
        );
        assert_eq!(
            relay_ends(true, b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n"),
            (true, false)
        );
        assert_eq!(
            relay_ends(
                false,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
            ),
            (false, false)
        );
        assert_eq!(
            relay_ends(
                false,
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"
            ),
            (false, true)
        );
    }
}
