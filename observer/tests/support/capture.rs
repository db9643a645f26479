//! Helpers for the kernel capture tests: free ports, capture configurations, collecting events
//! until a condition holds (bounded in time), and views of the events of one connection.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, time::Duration};

use observer::base::{ConnRecord, Direction, Role, Side, WatchedPort};
use observer::capture::{
    Capture, CaptureConfig,
    decode::{DataRecord, Event},
    reader::EventReader,
};

/// How long a test waits for the events it expects.
pub const EVENT_WAIT: Duration = Duration::from_secs(5);

/// A port nothing listens on now, never the same twice in one test process.
#[allow(unused_imports, reason = "each test binary uses a part of support")]
pub use testkit::net::free_port;

/// A capture of `watch` with the default sizes.
pub fn config(watch: &[(u16, Role)], exclude_self: bool) -> CaptureConfig {
    CaptureConfig {
        watch: watch
            .iter()
            .map(|&(port, role)| WatchedPort { port, role })
            .collect(),
        exclude_self,
        ..CaptureConfig::default()
    }
}

/// Starts a capture and its reader.
pub fn start(config: &CaptureConfig) -> (Capture, EventReader) {
    let mut capture = Capture::start(config).expect("load and attach the kernel programs");
    let reader = EventReader::new(capture.take_events().unwrap()).unwrap();
    (capture, reader)
}

/// Reads into `events` until `check` accepts them; panics after [`EVENT_WAIT`] with the last
/// complaint of `check` and a summary of what came.
pub async fn collect_until(
    reader: &mut EventReader,
    events: &mut Vec<Event<'static>>,
    mut check: impl FnMut(&[Event<'static>]) -> Result<(), String>,
) {
    let deadline = tokio::time::Instant::now() + EVENT_WAIT;
    loop {
        let complaint = match check(events) {
            Ok(()) => break,
            Err(complaint) => complaint,
        };
        match tokio::time::timeout_at(deadline, reader.read_batch(events)).await {
            Ok(read) => {
                read.unwrap();
            }
            Err(_) => panic!(
                "timed out waiting for events: {complaint}\n{} events:\n{}",
                events.len(),
                summary(events)
            ),
        }
    }
    assert_no_decode_errors(reader);
}

/// Reads into `events` until nothing arrives for `quiet`.
pub async fn collect_quiet(
    reader: &mut EventReader,
    events: &mut Vec<Event<'static>>,
    quiet: Duration,
) {
    while let Ok(read) = tokio::time::timeout(quiet, reader.read_batch(events)).await {
        read.unwrap();
    }
    assert_no_decode_errors(reader);
}

/// Nothing was lost, left untracked or unreadable on the kernel side.
pub fn assert_no_loss(capture: &Capture) {
    let counters = capture.counters().unwrap();
    assert_eq!(
        (
            counters.lost_data,
            counters.lost_conn,
            counters.conns_full,
            counters.read_user_failed
        ),
        (0, 0, 0, 0),
        "{counters:?}"
    );
}

pub fn assert_no_decode_errors(reader: &EventReader) {
    assert!(
        reader.decode_errors().is_empty(),
        "decode errors: {:?}",
        reader.decode_errors()
    );
}

/// The events of one connection, in ring order.
#[derive(Debug, Default, Clone)]
pub struct ConnView {
    pub open: Option<ConnRecord>,
    pub data: Vec<DataRecord<'static>>,
    pub close: Option<ConnRecord>,
}

impl ConnView {
    /// Bytes moved in `direction`, by the syscalls' return values.
    pub fn total(&self, direction: Direction) -> u64 {
        self.data
            .iter()
            .filter(|d| d.direction == direction)
            .map(|d| d.len)
            .sum()
    }

    /// The bytes moved in `direction`, when every event captured all of its bytes.
    pub fn bytes(&self, direction: Direction) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for data in self.data.iter().filter(|d| d.direction == direction) {
            out.extend(complete_bytes(data).ok_or_else(|| {
                format!(
                    "partial capture: len {} head {} tail {}",
                    data.len,
                    data.head.len(),
                    data.tail.len()
                )
            })?);
        }
        Ok(out)
    }

    /// Kernel timestamps of open, data and close, in ring order.
    pub fn timestamps(&self) -> Vec<u64> {
        let open = self.open.iter().map(|o| o.ts_ns);
        let data = self.data.iter().map(|d| d.ts_ns);
        let close = self.close.iter().map(|c| c.ts_ns);
        open.chain(data).chain(close).collect()
    }
}

/// `head ++ tail` when together they are every byte the syscall moved.
pub fn complete_bytes(data: &DataRecord<'_>) -> Option<Vec<u8>> {
    ((data.head.len() + data.tail.len()) as u64 == data.len)
        .then(|| [&data.head[..], &data.tail[..]].concat())
}

/// Events grouped by connection id.
pub fn by_conn(events: &[Event<'static>]) -> BTreeMap<u64, ConnView> {
    let mut conns: BTreeMap<u64, ConnView> = BTreeMap::new();
    for event in events {
        match event {
            Event::Open(open) => conns.entry(open.conn_id).or_default().open = Some(open.clone()),
            Event::Data(data) => conns
                .entry(data.conn_id)
                .or_default()
                .data
                .push(data.clone()),
            Event::Close(close) => {
                conns.entry(close.conn_id).or_default().close = Some(close.clone())
            }
        }
    }
    conns
}

/// The open event of the connection `tgid` holds as `fd` on `side`.
pub fn find_open<'a>(
    events: &'a [Event<'static>],
    tgid: u32,
    side: Side,
    fd: u32,
) -> Option<&'a ConnRecord> {
    events.iter().find_map(|e| match e {
        Event::Open(o) if o.tgid == tgid && o.side == side && o.fd == fd => Some(o),
        _ => None,
    })
}

/// The open event of the server side whose peer is `remote`.
pub fn find_server_open<'a>(
    events: &'a [Event<'static>],
    remote: SocketAddr,
) -> Option<&'a ConnRecord> {
    events.iter().find_map(|e| match e {
        Event::Open(o) if o.side == Side::Server && o.remote == Some(remote) => Some(o),
        _ => None,
    })
}

/// One short line per event, payloads cut to 48 escaped bytes: for failure messages.
pub fn summary(events: &[Event<'static>]) -> String {
    let mut out = String::new();
    for event in events {
        let _ = match event {
            Event::Data(d) => writeln!(
                out,
                "  data  conn {} {:?} {:?} {:?} tgid {} pid {} {:?} fd {} port {} len {} head {} tail {} {:?}",
                d.conn_id,
                d.role,
                d.side,
                d.direction,
                d.tgid,
                d.pid,
                d.comm,
                d.fd,
                d.port,
                d.len,
                d.head.len(),
                d.tail.len(),
                String::from_utf8_lossy(&d.head[..d.head.len().min(48)])
            ),
            Event::Open(c) | Event::Close(c) => writeln!(
                out,
                "  {} conn {} {:?} {:?} tgid {} pid {} {:?} fd {} port {} local {:?} remote {:?} seeded {}",
                if matches!(event, Event::Open(_)) {
                    "open "
                } else {
                    "close"
                },
                c.conn_id,
                c.role,
                c.side,
                c.tgid,
                c.pid,
                c.comm,
                c.fd,
                c.port,
                c.local,
                c.remote,
                c.seeded
            ),
        };
    }
    out
}

/// A deterministic, non-repeating-looking byte pattern, so that an offset error shows.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            // xorshift32
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect()
}

/// Checks every data event of `view` in `direction` against `stream`, the bytes that
/// direction carried, at an offset accumulated from each event's `len`: the head holds the
/// first min(len, `head_bytes`) bytes of the syscall's bytes, the tail the last bytes not in
/// the head, exactly `tail_bytes` of them or all there are (for iovec calls too: the tail is
/// gathered across segments), and the lengths add up to the whole stream.
pub fn assert_payload(
    view: &ConnView,
    direction: Direction,
    stream: &[u8],
    (head_bytes, tail_bytes): (usize, usize),
) {
    let mut offset = 0usize;
    for (i, data) in view
        .data
        .iter()
        .filter(|d| d.direction == direction)
        .enumerate()
    {
        let len = data.len as usize;
        assert!(
            offset + len <= stream.len(),
            "{direction:?} event {i}: {len} bytes at offset {offset} overrun the {} bytes sent",
            stream.len()
        );
        let moved = &stream[offset..offset + len];
        let head_len = len.min(head_bytes);
        assert_eq!(
            data.head.len(),
            head_len,
            "{direction:?} event {i} (len {len}, offset {offset}): head length"
        );
        assert!(
            *data.head == moved[..head_len],
            "{direction:?} event {i} (len {len}, offset {offset}): head bytes differ"
        );
        let tail_max = tail_bytes.min(len - head_len);
        assert_eq!(
            data.tail.len(),
            tail_max,
            "{direction:?} event {i} (len {len}, offset {offset}): tail length"
        );
        assert!(
            *data.tail == moved[len - data.tail.len()..],
            "{direction:?} event {i} (len {len}, offset {offset}): tail bytes differ"
        );
        offset += len;
    }
    assert_eq!(offset, stream.len(), "{direction:?}: bytes captured in all");
}

/// The calling thread's name as the kernel has it (what events report as `comm`).
pub fn thread_comm() -> String {
    std::fs::read_to_string("/proc/thread-self/comm")
        .unwrap()
        .trim_end()
        .to_owned()
}
