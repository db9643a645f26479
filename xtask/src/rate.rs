//! An open-loop load generator at a fixed request rate: `GET path` over N keep-alive HTTP/1.1
//! connections, one thread each, request `i` scheduled at `start + i / rate` (connection
//! `i mod N` sends it). A connection sends a request when its time has come and the previous
//! response is in (no pipelining); the latency is recorded both from the scheduled time (so a
//! stall delays every request queued behind it and shows, instead of being hidden as a
//! closed-loop client such as `wrk` hides it: coordinated omission) and from the actual send.
//! Responses are counted exactly by status: when the time is up every request already sent is
//! waited for, so nothing is in flight when it returns.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::common::stats::percentile;

/// How late the sending may run past the end of the schedule before the rest is given up
/// (counted in [`RateResult::unsent`]): a generator that cannot keep up must not run forever.
const SEND_GRACE: Duration = Duration::from_secs(2);
/// How long one response may take before its connection counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What to send, how fast, for how long.
#[derive(Clone, Debug)]
pub struct RateConfig {
    pub addr: SocketAddr,
    pub path: String,
    /// Requests per second, over all connections.
    pub rate: f64,
    pub duration: Duration,
    pub connections: usize,
}

/// What a run did. Latencies are sorted, in nanoseconds, one per completed response.
#[derive(Debug, Default)]
pub struct RateResult {
    /// Requests the schedule held (`rate × duration`).
    pub scheduled: u64,
    /// Requests written.
    pub sent: u64,
    /// Scheduled but never sent: the generator fell more than [`SEND_GRACE`] behind.
    pub unsent: u64,
    /// Whole responses, by status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests sent whose connection failed before the whole response (reconnected after).
    pub failed: u64,
    /// From the first scheduled send to the last response.
    pub elapsed: Duration,
    /// From the first scheduled send to the last actual send.
    pub send_window: Duration,
    /// The most any request was sent after its scheduled time.
    pub max_send_lag: Duration,
    pub from_schedule_ns: Vec<u64>,
    pub from_send_ns: Vec<u64>,
}

impl RateResult {
    /// Whole responses, any status.
    pub fn completed(&self) -> u64 {
        self.by_status.values().sum()
    }

    /// Requests sent per second over the sending window.
    pub fn achieved_rate(&self) -> f64 {
        self.sent as f64 / self.send_window.as_secs_f64().max(1e-9)
    }

    /// Percentile (0–100) of the latency from the scheduled time, in microseconds.
    pub fn latency_from_schedule_us(&self, p: f64) -> f64 {
        percentile(&self.from_schedule_ns, p).unwrap_or(0) as f64 / 1e3
    }

    /// Percentile (0–100) of the latency from the actual send, in microseconds.
    pub fn latency_from_send_us(&self, p: f64) -> f64 {
        percentile(&self.from_send_ns, p).unwrap_or(0) as f64 / 1e3
    }

    /// `200: 1000, 502: 3`.
    pub fn statuses(&self) -> String {
        let list: Vec<String> = self
            .by_status
            .iter()
            .map(|(code, n)| format!("{code}: {n}"))
            .collect();
        list.join(", ")
    }

    fn merge(&mut self, other: RateResult) {
        self.sent += other.sent;
        self.unsent += other.unsent;
        for (code, n) in other.by_status {
            *self.by_status.entry(code).or_default() += n;
        }
        self.failed += other.failed;
        self.elapsed = self.elapsed.max(other.elapsed);
        self.send_window = self.send_window.max(other.send_window);
        self.max_send_lag = self.max_send_lag.max(other.max_send_lag);
        self.from_schedule_ns.extend(other.from_schedule_ns);
        self.from_send_ns.extend(other.from_send_ns);
    }
}

/// Runs the schedule and returns once every request sent has its response (or its
/// connection failed). Fails only when it cannot connect at all.
pub fn run(config: &RateConfig) -> anyhow::Result<RateResult> {
    if config.rate <= 0.0 || config.connections == 0 {
        bail!("a rate and at least one connection are needed");
    }
    let scheduled = (config.rate * config.duration.as_secs_f64()).round() as u64;
    // Connect first, so connecting is not in the schedule.
    let streams = (0..config.connections)
        .map(|_| connect(config.addr))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: bench\r\nUser-Agent: xtask-rate\r\n\r\n",
        config.path
    );
    // Starting a little ahead, so that every thread is waiting when the schedule begins.
    let start = Instant::now() + Duration::from_millis(50);
    let n = config.connections as u64;
    let results: Vec<anyhow::Result<RateResult>> = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(c, stream)| {
                let request = request.as_bytes();
                let config = config.clone();
                scope.spawn(move || {
                    let mine = (c as u64..scheduled).step_by(n as usize);
                    connection(&config, stream, request, start, mine)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a load thread panicked"))
            .collect()
    });
    let mut total = RateResult {
        scheduled,
        ..RateResult::default()
    };
    for result in results {
        total.merge(result?);
    }
    total.from_schedule_ns.sort_unstable();
    total.from_send_ns.sort_unstable();
    Ok(total)
}

fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(RESPONSE_TIMEOUT))?;
    Ok(stream)
}

/// One connection's share of the schedule: the requests `indices`, in order.
fn connection(
    config: &RateConfig,
    mut stream: TcpStream,
    request: &[u8],
    start: Instant,
    indices: impl Iterator<Item = u64>,
) -> anyhow::Result<RateResult> {
    fine_timer_slack();
    let mut result = RateResult::default();
    let give_up = start + config.duration + SEND_GRACE;
    let mut reader = ResponseReader::default();
    for i in indices {
        let due = start + Duration::from_secs_f64(i as f64 / config.rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        } else if now > give_up {
            result.unsent += 1;
            continue;
        }
        let sent = Instant::now();
        result.max_send_lag = result.max_send_lag.max(sent.saturating_duration_since(due));
        result.send_window = result
            .send_window
            .max(sent.saturating_duration_since(start));
        result.sent += 1;
        let answer = stream
            .write_all(request)
            .map_err(anyhow::Error::from)
            .and_then(|()| reader.read(&mut stream));
        let done = Instant::now();
        match answer {
            Ok(status) => {
                *result.by_status.entry(status).or_default() += 1;
                result
                    .from_schedule_ns
                    .push(done.saturating_duration_since(due).as_nanos() as u64);
                result
                    .from_send_ns
                    .push(done.saturating_duration_since(sent).as_nanos() as u64);
            }
            Err(_) => {
                result.failed += 1;
                reader = ResponseReader::default();
                stream = connect(config.addr)?;
            }
        }
        result.elapsed = result.elapsed.max(done.saturating_duration_since(start));
    }
    Ok(result)
}

/// Wake-ups as close to the scheduled time as the kernel can (the default slack is 50 µs).
fn fine_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

/// Reads one response at a time from a keep-alive connection: the head, then a
/// Content-Length body. Bytes past one response (none without pipelining) are kept.
#[derive(Default)]
struct ResponseReader {
    buf: Vec<u8>,
}

impl ResponseReader {
    /// The status of the next whole response.
    fn read(&mut self, stream: &mut impl std::io::Read) -> anyhow::Result<u16> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((status, len)) = parse_response(&self.buf)? {
                self.buf.drain(..len);
                return Ok(status);
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                bail!("connection closed before the whole response");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// `Some((status, length of the whole response))` once `buf` starts with a whole response;
/// `None` while it is partial. Only Content-Length bodies (or none) are read.
fn parse_response(buf: &[u8]) -> anyhow::Result<Option<(u16, usize)>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("a response head that is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not a status line: {status_line:?}"))?;
    let mut length = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().context("a bad Content-Length")?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("a chunked response (only Content-Length bodies are read)");
        }
    }
    let whole = end + 4 + length;
    Ok((buf.len() >= whole).then_some((status, whole)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{io::Read as _, net::TcpListener};

    #[test]
    fn parses_whole_responses_only() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}";
        assert_eq!(parse_response(ok).unwrap(), Some((200, ok.len())));
        assert_eq!(parse_response(&ok[..ok.len() - 1]).unwrap(), None);
        assert_eq!(parse_response(&ok[..20]).unwrap(), None);
        let empty = b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200";
        assert_eq!(
            parse_response(empty).unwrap(),
            Some((502, empty.len() - 12))
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert!(parse_response(b"SSH-2.0-x\r\n\r\n").is_err());
    }

    #[test]
    fn reads_a_response_split_across_reads_and_keeps_the_next() {
        let bytes = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        // A reader that hands out 5 bytes at a time.
        struct Slow<'a>(&'a [u8]);
        impl std::io::Read for Slow<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(5).min(out.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut source = Slow(bytes);
        let mut reader = ResponseReader::default();
        assert_eq!(reader.read(&mut source).unwrap(), 404);
        assert_eq!(reader.read(&mut source).unwrap(), 200);
        assert!(reader.read(&mut source).is_err(), "closed");
    }

    /// A keep-alive server answering every request, every seventh with 503; it counts the
    /// requests it saw.
    fn server() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
        use std::sync::{Arc, atomic::AtomicU64, atomic::Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                            let answer: &[u8] = if n.is_multiple_of(7) {
                                b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"
                            } else {
                                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                            };
                            if stream.write_all(answer).is_err() {
                                return;
                            }
                        }
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    #[test]
    fn sends_the_schedule_and_counts_every_response_by_status() {
        let (addr, seen) = server();
        let config = RateConfig {
            addr,
            path: "/x".into(),
            rate: 2000.0,
            duration: Duration::from_millis(500),
            connections: 4,
        };
        let r = run(&config).unwrap();
        assert_eq!(r.scheduled, 1000);
        assert_eq!((r.sent, r.unsent, r.failed), (1000, 0, 0));
        assert_eq!(r.completed(), 1000);
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1000);
        assert_eq!(r.by_status[&503], 1000 / 7);
        assert_eq!(r.by_status[&200], 1000 - 1000 / 7);
        assert_eq!(r.from_schedule_ns.len(), 1000);
        assert!(r.latency_from_schedule_us(50.0) >= r.latency_from_send_us(50.0));
        // Paced, not as fast as possible: the last send is near the end of the schedule.
        assert!(
            r.send_window >= Duration::from_millis(490),
            "{:?}",
            r.send_window
        );
        assert!(r.achieved_rate() > 1900.0 && r.achieved_rate() < 2100.0);
    }
}
