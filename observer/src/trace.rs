//! `observer trace`: the capture's events as they happen, one JSON line each on stdout.
//!
//! A debugging window onto the kernel side: it starts the capture with the flags of
//! [`CaptureArgs`] (shared with `observer run`), prints the connections seeded from `/proc`,
//! then every decoded event until SIGINT or SIGTERM, and a one-line summary of what was lost.
//! It owns the JSON form of an event and the wall-clock conversion of kernel timestamps; it
//! parses no HTTP and keeps no state per connection.

use std::{io, net::SocketAddr, process::ExitCode};

use anyhow::Context as _;

use crate::base::{
    ConnRecord, Direction, Role, Side,
    clock::{ClockOffset, rfc3339_nanos},
    watch_list,
};
use crate::capture::{
    CaptureArgs, KernelCounters,
    decode::{DataRecord, Event},
    endpoints::EndpointBook,
};
use crate::daemon::{Kernel, Signals};
use crate::engine::{Engine, EngineConfig, Exchange};

/// Flags of `observer trace`.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub capture: CaptureArgs,
    /// Bytes of each data event's head shown (escaped) in `preview`.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub preview_bytes: usize,
    /// Print finished HTTP exchanges (from the engine) instead of raw events.
    #[arg(long)]
    pub exchanges: bool,
}

/// How often the connections of exited processes are looked for.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

impl TraceArgs {
    /// The capture's settings, as `observer run` checks them.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.capture.to_config().validate()
    }
}

/// Runs the trace until SIGINT or SIGTERM (or until stdout goes away).
pub async fn run(args: TraceArgs) -> anyhow::Result<ExitCode> {
    // Listened for before anything is attached, so a signal right after the ready line is
    // handled here rather than killing the process with the programs attached.
    let mut signals = Signals::listen()?;

    let config = args.capture.to_config();
    let mut kernel = Kernel::start(&config).await?;
    let clock = ClockOffset::now();
    let Kernel {
        capture, events, ..
    } = &mut kernel;
    eprintln!(
        "observer trace: watching {} ({} programs attached, {} connections seeded)",
        watch_list(&config.watch),
        capture.attached().len(),
        capture.seeded().len()
    );

    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut printed = 0u64;
    let mut engine = args.exchanges.then(|| Engine::new(EngineConfig::default()));
    let mut batch = Vec::new();
    let mut sweep =
        tokio::time::interval_at(tokio::time::Instant::now() + SWEEP_INTERVAL, SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The kernel side cannot know every endpoint; /proc completes them, per batch.
    let mut endpoints = EndpointBook::new("/proc");
    let stdout_open = 'trace: {
        for conn in capture.seeded() {
            endpoints.remember(conn);
            if let Some(engine) = &mut engine {
                engine.open(conn.into(), conn.ts_ns, true);
                continue;
            }
            if !write_line(&mut out, &conn_line("open", conn, &clock))? {
                break 'trace false;
            }
            printed += 1;
        }
        if !flush(&mut out)? {
            break 'trace false;
        }
        loop {
            tokio::select! {
                () = signals.recv() => break 'trace true,
                read = events.read_batch(&mut batch) => {
                    read.context("reading the ring buffer")?;
                }
                _ = sweep.tick() => {
                    // Sockets of processes that exited without close(2): reported closed.
                    batch.extend(capture.sweep_exited()?.into_iter().map(Event::Close));
                }
            }
            endpoints.complete(&mut batch);
            if let Some(engine) = &mut engine {
                for event in batch.drain(..) {
                    feed_engine(engine, &event);
                }
                for exchange in engine.drain_finished() {
                    if !write_line(&mut out, &ExchangeLine::new(&exchange, &clock))? {
                        break 'trace false;
                    }
                    printed += 1;
                }
            }
            for event in batch.drain(..) {
                if !write_line(&mut out, &event_line(&event, &clock, args.preview_bytes))? {
                    break 'trace false;
                }
                printed += 1;
            }
            if !flush(&mut out)? {
                break 'trace false;
            }
        }
    };
    drop(out);
    if !stdout_open {
        tracing::debug!("stdout closed; stopping");
    }

    kernel.stop()?;
    let counters = kernel.capture.counters()?;
    let decode_errors: u64 = kernel.events.decode_errors().values().sum();
    let what = if args.exchanges {
        "exchanges"
    } else {
        "events"
    };
    eprintln!("{}", summary(printed, what, &counters, decode_errors));
    Ok(ExitCode::SUCCESS)
}

/// Writes one line; `false` when the reader of stdout has gone away (a closed pipe).
fn write_line(out: &mut impl io::Write, line: &impl serde::Serialize) -> anyhow::Result<bool> {
    let written = serde_json::to_writer(&mut *out, line)
        .map_err(io::Error::from)
        .and_then(|()| out.write_all(b"\n"));
    still_open(written)
}

fn flush(out: &mut impl io::Write) -> anyhow::Result<bool> {
    still_open(out.flush())
}

fn still_open(result: io::Result<()>) -> anyhow::Result<bool> {
    match result {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(err) => Err(err).context("writing to stdout"),
    }
}

/// The last line on stderr: how much was shown and what the kernel side could not report.
pub fn summary(printed: u64, what: &str, counters: &KernelCounters, decode_errors: u64) -> String {
    format!(
        "observer trace: stopped; {printed} {what} printed; lost {} data and {} connection events, \
         connection table full {} times, listener table full {} times, \
         process table full {} times, {} failed user-memory reads, {} failed kernel-memory reads, \
         {} failed map updates, {decode_errors} decode errors",
        counters.lost_data,
        counters.lost_conn,
        counters.conns_full,
        counters.listeners_full,
        counters.tgids_full,
        counters.read_user_failed,
        counters.read_kernel_failed,
        counters.map_update_failed
    )
}

fn feed_engine(engine: &mut Engine, event: &Event) {
    match event {
        Event::Data(d) => engine.data(d.into(), d.direction, d.ts_ns, d.len, &d.head, &d.tail),
        Event::Open(c) => engine.open(c.into(), c.ts_ns, c.seeded),
        Event::Close(c) => engine.close(c.conn_id),
    }
}

/// One line of `--exchanges`: a finished exchange, its wall-clock start and its derived
/// durations in seconds.
#[derive(Debug, serde::Serialize)]
pub struct ExchangeLine<'a> {
    /// Wall-clock time of the request's first byte.
    pub time: String,
    pub duration_s: Option<f64>,
    pub time_to_first_byte_s: Option<f64>,
    pub time_to_first_chunk_s: Option<f64>,
    #[serde(flatten)]
    pub exchange: &'a Exchange,
}

impl<'a> ExchangeLine<'a> {
    pub fn new(exchange: &'a Exchange, clock: &ClockOffset) -> ExchangeLine<'a> {
        let seconds = |ns: Option<u64>| ns.map(|ns| ns as f64 / 1e9);
        ExchangeLine {
            time: rfc3339_nanos(clock.wall_ns(exchange.ts.request_first)),
            duration_s: seconds(exchange.ts.duration_ns()),
            time_to_first_byte_s: seconds(exchange.ts.time_to_first_byte_ns()),
            time_to_first_chunk_s: seconds(exchange.ts.time_to_first_chunk_ns()),
            exchange,
        }
    }
}

/// One line of output: the fields every event has, in this order, then those of its kind.
#[derive(Debug, serde::Serialize)]
pub struct TraceLine<'a> {
    /// Wall-clock time of `ts_ns`, RFC 3339 UTC with nanoseconds.
    pub time: String,
    /// Kernel monotonic timestamp.
    pub ts_ns: u64,
    /// `data`, `open` or `close`.
    pub event: &'static str,
    pub conn_id: u64,
    pub role: Role,
    pub side: Side,
    pub tgid: u32,
    pub pid: u32,
    pub comm: &'a str,
    pub fd: u32,
    pub port: u16,
    #[serde(flatten)]
    pub detail: Detail,
}

/// What only one kind of event has.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum Detail {
    Data {
        direction: Direction,
        len: u64,
        head_len: usize,
        tail_len: usize,
        /// The first bytes of `head`, escaped by [`escape_preview`].
        preview: String,
    },
    Conn {
        local: Option<SocketAddr>,
        remote: Option<SocketAddr>,
        seeded: bool,
    },
}

/// The JSON line of a decoded event.
pub fn event_line<'a>(
    event: &'a Event,
    clock: &ClockOffset,
    preview_bytes: usize,
) -> TraceLine<'a> {
    match event {
        Event::Data(data) => data_line(data, clock, preview_bytes),
        Event::Open(conn) => conn_line("open", conn, clock),
        Event::Close(conn) => conn_line("close", conn, clock),
    }
}

fn data_line<'a>(data: &'a DataRecord, clock: &ClockOffset, preview_bytes: usize) -> TraceLine<'a> {
    TraceLine {
        time: rfc3339_nanos(clock.wall_ns(data.ts_ns)),
        ts_ns: data.ts_ns,
        event: "data",
        conn_id: data.conn_id,
        role: data.role,
        side: data.side,
        tgid: data.tgid,
        pid: data.pid,
        comm: &data.comm,
        fd: data.fd,
        port: data.port,
        detail: Detail::Data {
            direction: data.direction,
            len: data.len,
            head_len: data.head.len(),
            tail_len: data.tail.len(),
            preview: escape_preview(&data.head[..data.head.len().min(preview_bytes)]),
        },
    }
}

fn conn_line<'a>(event: &'static str, conn: &'a ConnRecord, clock: &ClockOffset) -> TraceLine<'a> {
    TraceLine {
        time: rfc3339_nanos(clock.wall_ns(conn.ts_ns)),
        ts_ns: conn.ts_ns,
        event,
        conn_id: conn.conn_id,
        role: conn.role,
        side: conn.side,
        tgid: conn.tgid,
        pid: conn.pid,
        comm: &conn.comm,
        fd: conn.fd,
        port: conn.port,
        detail: Detail::Conn {
            local: conn.local,
            remote: conn.remote,
            seeded: conn.seeded,
        },
    }
}

/// Payload bytes for a terminal or a log: printable ASCII as is, `\r` `\n` `\t` and the
/// backslash escaped, anything else `\xNN`.
pub fn escape_preview(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            other => out.push_str(&format!("\\x{other:02x}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn preview_escapes_control_and_binary_bytes() {
        assert_eq!(
            escape_preview(b"POST /api/chat HTTP/1.1\r\n\tx"),
            "POST /api/chat HTTP/1.1\\r\\n\\tx"
        );
        assert_eq!(escape_preview(b"a\\b"), "a\\\\b");
        assert_eq!(
            escape_preview(&[0, 0x1f, 0x7f, 0x80, 0xff]),
            "\\x00\\x1f\\x7f\\x80\\xff"
        );
        assert_eq!(escape_preview("é".as_bytes()), "\\xc3\\xa9");
        assert_eq!(escape_preview(b" ~"), " ~");
        assert_eq!(escape_preview(b""), "");
    }

    #[test]
    fn timestamps_format_as_rfc3339_utc_with_nanoseconds() {
        assert_eq!(rfc3339_nanos(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339_nanos(42), "1970-01-01T00:00:00.000000042Z");
        // 2024-02-29T23:59:59.999999999Z: a leap day, the last nanosecond of it.
        assert_eq!(
            rfc3339_nanos(1_709_251_199_999_999_999),
            "2024-02-29T23:59:59.999999999Z"
        );
        assert_eq!(
            rfc3339_nanos(1_709_251_200_000_000_000),
            "2024-03-01T00:00:00.000000000Z"
        );
        assert_eq!(
            rfc3339_nanos(4_102_444_800_123_456_789),
            "2100-01-01T00:00:00.123456789Z"
        );
    }

    fn json(line: &TraceLine<'_>) -> String {
        serde_json::to_string(line).unwrap()
    }

    fn value(line: &TraceLine<'_>) -> serde_json::Value {
        serde_json::to_value(line).unwrap()
    }

    fn clock() -> ClockOffset {
        ClockOffset {
            realtime_minus_monotonic_ns: 1_700_000_000_000_000_000,
        }
    }

    #[test]
    fn data_event_line_has_every_field_in_order() {
        let data = DataRecord {
            ts_ns: 1_234,
            conn_id: 7,
            tgid: 100,
            pid: 101,
            comm: "nginx".into(),
            role: Role::Gateway,
            side: Side::Server,
            direction: Direction::Ingress,
            fd: 5,
            port: 18789,
            len: 3000,
            head: b"POST /api/chat HTTP/1.1\r\nHost: x\r\n\r\n{\"model\":\"m\"}".into(),
            tail: b"end\x00".into(),
        };
        let event = Event::Data(data);
        assert_eq!(
            json(&event_line(&event, &clock(), 16)),
            concat!(
                r#"{"time":"2023-11-14T22:13:20.000001234Z","ts_ns":1234,"event":"data","#,
                r#""conn_id":7,"role":"gateway","side":"server","tgid":100,"pid":101,"#,
                r#""comm":"nginx","fd":5,"port":18789,"direction":"ingress","len":3000,"#,
                r#""head_len":49,"tail_len":4,"preview":"POST /api/chat H"}"#
            )
        );
        let short = DataRecord {
            ts_ns: 0,
            conn_id: 1,
            tgid: 1,
            pid: 1,
            comm: "".into(),
            role: Role::Upstream,
            side: Side::Client,
            direction: Direction::Egress,
            fd: 3,
            port: 11434,
            len: 2,
            head: b"\r\n".into(),
            tail: b"".into(),
        };
        let line = value(&event_line(&Event::Data(short), &clock(), 64));
        assert_eq!(line["preview"], "\\r\\n");
        assert_eq!(line["direction"], "egress");
        assert_eq!(line["side"], "client");
        assert_eq!(line["role"], "upstream");
    }

    #[test]
    fn open_and_close_lines_carry_addresses_and_seeding() {
        let conn = ConnRecord {
            ts_ns: 5,
            conn_id: 9,
            tgid: 200,
            pid: 201,
            comm: "ollama".into(),
            role: Role::Upstream,
            side: Side::Server,
            fd: 12,
            port: 11434,
            local: Some("127.0.0.1:11434".parse().unwrap()),
            remote: Some("[::1]:40000".parse().unwrap()),
            seeded: true,
        };
        assert_eq!(
            json(&event_line(&Event::Open(conn.clone()), &clock(), 64)),
            concat!(
                r#"{"time":"2023-11-14T22:13:20.000000005Z","ts_ns":5,"event":"open","#,
                r#""conn_id":9,"role":"upstream","side":"server","tgid":200,"pid":201,"#,
                r#""comm":"ollama","fd":12,"port":11434,"local":"127.0.0.1:11434","#,
                r#""remote":"[::1]:40000","seeded":true}"#
            )
        );
        let client = ConnRecord {
            side: Side::Client,
            local: None,
            seeded: false,
            ..conn
        };
        let line = value(&event_line(&Event::Close(client), &clock(), 64));
        assert_eq!(line["event"], "close");
        assert_eq!(line["local"], serde_json::Value::Null);
        assert_eq!(line["seeded"], false);
    }

    use crate::base::WatchedPort;
    use crate::capture::CaptureConfig;

    #[derive(Debug, clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        trace: TraceArgs,
    }

    #[test]
    fn flags_default_to_the_capture_defaults() {
        let args = Wrapper::try_parse_from(["trace"]).unwrap().trace;
        let config = args.capture.to_config();
        let defaults = CaptureConfig::default();
        assert_eq!(config.watch, WatchedPort::defaults());
        assert_eq!(
            (config.head_bytes, config.tail_bytes, config.ring_bytes),
            (1024, 256, 8 * 1024 * 1024)
        );
        assert_eq!(config.max_conns, defaults.max_conns);
        assert_eq!(config.max_listeners, defaults.max_listeners);
        assert!(config.exclude_self);
        assert_eq!(args.preview_bytes, 64);
    }

    #[test]
    fn flags_set_every_capture_field() {
        let args = Wrapper::try_parse_from([
            "trace",
            "--watch",
            "8080=gateway",
            "--watch",
            "9000=upstream",
            "--head-bytes",
            "512",
            "--tail-bytes",
            "64",
            "--ring-bytes",
            "65536",
            "--max-conns",
            "10",
            "--max-listeners",
            "7",
            "--include-self",
            "--preview-bytes",
            "8",
        ])
        .unwrap()
        .trace;
        let config = args.capture.to_config();
        assert_eq!(watch_list(&config.watch), "8080=gateway, 9000=upstream");
        assert_eq!(
            (
                config.head_bytes,
                config.tail_bytes,
                config.ring_bytes,
                config.max_conns
            ),
            (512, 64, 65536, 10)
        );
        assert_eq!(config.max_listeners, 7);
        assert!(!config.exclude_self);
        assert_eq!(args.preview_bytes, 8);
        assert!(Wrapper::try_parse_from(["trace", "--watch", "80=proxy"]).is_err());
    }

    #[test]
    fn summary_names_every_loss() {
        // Every field: a new counter should show in the summary too.
        let counters = KernelCounters {
            lost_data: 3,
            lost_conn: 1,
            conns_full: 2,
            listeners_full: 6,
            read_user_failed: 4,
            tgids_full: 7,
            read_kernel_failed: 8,
            map_update_failed: 9,
        };
        let line = summary(10, "events", &counters, 5);
        assert_eq!(
            line,
            "observer trace: stopped; 10 events printed; lost 3 data and 1 connection events, \
             connection table full 2 times, listener table full 6 times, \
             process table full 7 times, 4 failed user-memory reads, 8 failed kernel-memory reads, \
             9 failed map updates, 5 decode errors"
        );
    }
}
