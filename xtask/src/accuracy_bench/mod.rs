//! `cargo xtask bench accuracy`: how close the observer's per-request timings are to what the
//! client measures at its own socket. nginx (the gateway) in front of `observer sim` (streaming
//! with realistic but short delays), `observer run` (release build) watching both ports. A
//! client sends one chat request at a time on a keep-alive connection and times it at its
//! socket; after each, it scrapes `/metrics` until the gateway's request count has grown by
//! one, and takes the growth of the gateway's duration and time-to-first-chunk histogram sums
//! as the observer's figures for that request. It reports the median and p99 of
//! |observer − client| per round, and their median and spread over the rounds, and rewrites
//! the section "Timing accuracy" of `docs/BENCHMARKS.md`. It asserts nothing about the figures;
//! it fails only if an exchange goes wrong or is not counted exactly once.
//!
//! `report` writes the markdown.

mod report;

use std::{
    fmt,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;

use crate::{
    chat::{self, Api, ChatClient, ChatRequest, Outcome},
    common::{
        machine::CpuClock,
        report::DocArgs,
        stats::{Spread, percentile},
    },
    observer_run::{ObserverRun, WATCH_ONLY, release_binary},
};

/// `observer sim`'s defaults for every request; each request then sets its own timing with
/// `X-Sim-Fault` ([`timing_of`]). No load delay, so that the first request is like the rest.
const SIM_FLAGS: [&str; 4] = ["--load-ms", "0", "--seed", "1"];
/// Requests before the first round, timed and counted but not reported.
const WARM_UP: usize = 5;
/// How long the daemon may take to count an exchange after the client has read its end.
const COUNTED_WITHIN: Duration = Duration::from_secs(5);

/// Options after `cargo xtask bench accuracy --`.
#[derive(Parser)]
#[command(name = "bench accuracy")]
struct Options {
    /// Requests per round, one at a time.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[command(flatten)]
    doc: DocArgs,
}

/// The kinds of request, in the order a round cycles through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `/api/chat` or `/api/generate`, streamed: NDJSON.
    Ndjson,
    /// `/v1/chat/completions`, streamed: server-sent events.
    Sse,
    /// `/api/chat`, not streamed: one JSON document.
    Whole,
}

const KINDS: [Kind; 3] = [Kind::Ndjson, Kind::Sse, Kind::Whole];

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Ndjson => "NDJSON streams (`/api/chat`, `/api/generate`)",
            Kind::Sse => "SSE streams (`/v1/chat/completions`)",
            Kind::Whole => "not streamed (`/api/chat`)",
        })
    }
}

/// Request `i` of a round: of every five, two streamed chats, a streamed generate, an
/// OpenAI stream and a non-streamed chat.
fn request_of(i: usize) -> (Kind, ChatRequest) {
    let (kind, api, stream) = match i % 5 {
        0 | 1 => (Kind::Ndjson, Api::Chat, true),
        2 => (Kind::Ndjson, Api::Generate, true),
        3 => (Kind::Sse, Api::OpenAiChat, true),
        _ => (Kind::Whole, Api::Chat, false),
    };
    let mut request = ChatRequest::new(api, stream).with_sim(timing_of(i));
    request.prompt = format!("Question {i}: why is the sky blue?");
    (kind, request)
}

/// This request's simulated timing: first token after 20–50 ms, then 10–30 tokens 2–5 ms apart
/// (a small model on a GPU), varied from one request to the next.
fn timing_of(i: usize) -> String {
    // A fixed scramble of i, so that the timings do not move in step with the kinds.
    let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    format!(
        "first-token-ms={}, token-ms={}, tokens={}",
        20 + h % 31,
        2 + (h >> 8) % 4,
        10 + (h >> 16) % 21
    )
}

/// One request: the client's and the observer's timings, in seconds.
#[derive(Clone, Copy, Debug)]
struct Sample {
    kind: Kind,
    client_duration: f64,
    observer_duration: f64,
    client_first_chunk: f64,
    observer_first_chunk: f64,
}

impl Sample {
    fn duration_diff(&self) -> f64 {
        self.observer_duration - self.client_duration
    }

    fn first_chunk_diff(&self) -> f64 {
        self.observer_first_chunk - self.client_first_chunk
    }
}

/// One round's samples, and how busy the rest of the machine was meanwhile.
struct Round {
    samples: Vec<Sample>,
    others_cores: f64,
}

/// The gateway's figures on `/metrics` that one exchange adds to.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Counters {
    requests: f64,
    duration_sum: f64,
    duration_count: f64,
    first_chunk_sum: f64,
    first_chunk_count: f64,
}

impl Counters {
    fn read(observer: &ObserverRun) -> anyhow::Result<Counters> {
        let scrape = observer.scrape()?;
        let gateway = [("role", "gateway")];
        let get = |name: &str| scrape.sum(name, &gateway);
        Ok(Counters {
            requests: get("observer_http_requests_total"),
            duration_sum: get("observer_http_request_duration_seconds_sum"),
            duration_count: get("observer_http_request_duration_seconds_count"),
            first_chunk_sum: get("gen_ai_server_time_to_first_token_seconds_sum"),
            first_chunk_count: get("gen_ai_server_time_to_first_token_seconds_count"),
        })
    }

    /// Scrapes until the gateway's request count has grown past `self`'s.
    fn next(&self, observer: &ObserverRun) -> anyhow::Result<Counters> {
        let started = Instant::now();
        loop {
            let now = Counters::read(observer)?;
            if now.requests > self.requests {
                return Ok(now);
            }
            if started.elapsed() > COUNTED_WITHIN {
                bail!(
                    "the gateway's request count stayed at {} for {} s after a complete exchange",
                    self.requests,
                    COUNTED_WITHIN.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

pub fn run(workspace: &Path, args: &[String]) -> anyhow::Result<()> {
    // `parse_from`: `--help` prints and exits, a bad option says why and exits 2.
    let opts = Options::parse_from(
        std::iter::once("bench accuracy").chain(args.iter().map(String::as_str)),
    );
    if opts.requests == 0 || opts.rounds == 0 {
        bail!("--requests and --rounds must be at least 1");
    }
    let binary = release_binary(workspace)?;
    let sim = chat::sim(&binary, &SIM_FLAGS)?;
    let gateway = chat::gateway("accuracy", sim.addr)?;
    let observer = ObserverRun::start(
        &binary,
        &[
            (gateway.addr.port(), "gateway"),
            (sim.addr.port(), "upstream"),
        ],
        &WATCH_ONLY,
    )?;
    println!(
        "gateway {} -> observer sim {}; observer run on {}",
        gateway.addr, sim.addr, observer.metrics
    );
    // The client and nginx's workers preempt whatever else runs on the machine: their wake-up
    // latency would otherwise land in one side of a comparison now and then.
    let workers = gateway.worker_pids();
    let realtime = realtime_thread(0) && workers.iter().all(|&pid| realtime_process(pid));
    if !realtime {
        println!("note: no real-time priority for the client or nginx's workers");
    }
    let mut pids = vec![std::process::id(), observer.pid()];
    pids.extend(gateway.master_pid());
    pids.extend(&workers);
    pids.extend(sim.pid());

    let mut client = ChatClient::new(gateway.addr, Duration::from_secs(10));
    let mut counters = Counters::read(&observer)?;
    for i in 0..WARM_UP {
        measure(&mut client, &observer, &mut counters, i).context("warm-up")?;
    }
    let mut rounds = Vec::new();
    for round in 1..=opts.rounds {
        let clock = CpuClock::start(&pids);
        let samples = (0..opts.requests)
            .map(|i| measure(&mut client, &observer, &mut counters, i))
            .collect::<anyhow::Result<Vec<_>>>()
            .with_context(|| format!("round {round}"))?;
        let round = Round {
            samples,
            others_cores: clock.others_cores(),
        };
        println!("round {}: {}", rounds.len() + 1, round.summary());
        rounds.push(round);
    }
    let scrape = observer.scrape()?;
    let lost = scrape.sum("observer_ebpf_events_lost_total", &[]) as u64;
    let parse_errors = scrape.sum("observer_http_parse_errors_total", &[]) as u64;
    observer.stop()?;

    let section = report::markdown(&opts, &rounds, realtime, lost, parse_errors);
    opts.doc.publish(workspace, &section)
}

/// Sends request `i` and reads the observer's figures for it; `counters` moves on to them.
fn measure(
    client: &mut ChatClient,
    observer: &ObserverRun,
    counters: &mut Counters,
    i: usize,
) -> anyhow::Result<Sample> {
    let (kind, request) = request_of(i);
    let exchange = client.send(&request);
    if exchange.outcome != Outcome::Complete || exchange.status != Some(200) {
        bail!(
            "{} {:?}: {} with status {:?}",
            request.api.route(),
            request.sim,
            exchange.outcome,
            exchange.status
        );
    }
    if kind != Kind::Whole && exchange.response.content_lines == 0 {
        bail!("{}: a stream without model output", request.api.route());
    }
    let (client_duration, client_first_chunk) = exchange
        .duration()
        .zip(exchange.time_to_first_chunk())
        .context("a complete exchange without its times")?;
    let before = *counters;
    let after = before.next(observer)?;
    *counters = after;
    let added = [
        after.requests - before.requests,
        after.duration_count - before.duration_count,
        after.first_chunk_count - before.first_chunk_count,
    ];
    if added != [1.0; 3] {
        bail!(
            "one exchange added {added:?} to the gateway's requests, durations and first chunks \
             (want one each)"
        );
    }
    Ok(Sample {
        kind,
        client_duration,
        observer_duration: after.duration_sum - before.duration_sum,
        client_first_chunk,
        observer_first_chunk: after.first_chunk_sum - before.first_chunk_sum,
    })
}

/// The median and p99 of |observer − client| over some samples, in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Accuracy {
    median: f64,
    p99: f64,
}

impl Accuracy {
    fn of(diffs: impl Iterator<Item = f64>) -> Option<Accuracy> {
        // Nanoseconds, for the shared nearest-rank percentile.
        let mut ns: Vec<u64> = diffs.map(|d| (d.abs() * 1e9).round() as u64).collect();
        ns.sort_unstable();
        let at = |p| percentile(&ns, p).map(|v| v as f64 / 1e9);
        Some(Accuracy {
            median: at(50.0)?,
            p99: at(99.0)?,
        })
    }
}

impl Round {
    fn of(&self, kind: Option<Kind>) -> impl Iterator<Item = &Sample> {
        self.samples
            .iter()
            .filter(move |s| kind.is_none_or(|k| s.kind == k))
    }

    /// Duration and time to first chunk, for one kind or (`None`) all.
    fn accuracy(&self, kind: Option<Kind>) -> Option<(Accuracy, Accuracy)> {
        Some((
            Accuracy::of(self.of(kind).map(Sample::duration_diff))?,
            Accuracy::of(self.of(kind).map(Sample::first_chunk_diff))?,
        ))
    }

    fn summary(&self) -> String {
        let Some((d, t)) = self.accuracy(None) else {
            return "no samples".into();
        };
        format!(
            "{} requests; |observer − client| duration median {:.3} ms, p99 {:.3} ms; time to \
             first chunk median {:.3} ms, p99 {:.3} ms; others used {:.2} cores",
            self.samples.len(),
            d.median * 1e3,
            d.p99 * 1e3,
            t.median * 1e3,
            t.p99 * 1e3,
            self.others_cores
        )
    }
}

/// The spread over rounds of one figure of each round's accuracy.
fn over_rounds(
    rounds: &[Round],
    kind: Option<Kind>,
    figure: impl Fn((Accuracy, Accuracy)) -> f64,
) -> Option<Spread> {
    let values: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r.accuracy(kind).map(&figure))
        .collect();
    Spread::of(values)
}

/// SCHED_FIFO priority 1 for a thread (0: the calling one).
fn realtime_thread(tid: i32) -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler reads `param`, which outlives the call.
    unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) == 0 }
}

/// SCHED_FIFO priority 1 for every thread of a process.
fn realtime_process(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
        tasks.flatten().all(|task| {
            task.file_name()
                .to_string_lossy()
                .parse()
                .is_ok_and(realtime_thread)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(kind: Kind, duration_diff_ms: f64, first_chunk_diff_ms: f64) -> Sample {
        Sample {
            kind,
            client_duration: 0.1,
            observer_duration: 0.1 + duration_diff_ms / 1e3,
            client_first_chunk: 0.03,
            observer_first_chunk: 0.03 + first_chunk_diff_ms / 1e3,
        }
    }

    #[test]
    fn accuracy_is_of_absolute_differences_by_nearest_rank() {
        // 100 differences: -0.01 ms .. -1.00 ms; |d| median 0.50 ms, p99 0.99 ms.
        let a = Accuracy::of((1..=100).map(|i| -(i as f64) * 1e-5)).unwrap();
        assert!(
            (a.median - 0.5e-3).abs() < 1e-12 && (a.p99 - 0.99e-3).abs() < 1e-12,
            "{a:?}"
        );
        assert_eq!(Accuracy::of(std::iter::empty()), None);
    }

    #[test]
    fn rounds_split_by_kind_and_spread_over_rounds() {
        let round = |scale: f64| Round {
            samples: vec![
                sample(Kind::Ndjson, -0.2 * scale, 0.1 * scale),
                sample(Kind::Ndjson, -0.4 * scale, 0.3 * scale),
                sample(Kind::Whole, 0.8 * scale, -0.5 * scale),
            ],
            others_cores: 0.0,
        };
        let rounds = [round(1.0), round(2.0), round(3.0)];
        let (d, t) = rounds[0].accuracy(Some(Kind::Ndjson)).unwrap();
        assert!((d.median - 0.2e-3).abs() < 1e-9 && (d.p99 - 0.4e-3).abs() < 1e-9);
        assert!((t.median - 0.1e-3).abs() < 1e-9 && (t.p99 - 0.3e-3).abs() < 1e-9);
        assert_eq!(rounds[0].accuracy(Some(Kind::Sse)), None);
        let all_p99 = over_rounds(&rounds, None, |(d, _)| d.p99).unwrap();
        assert!((all_p99.median - 1.6e-3).abs() < 1e-9, "{all_p99:?}");
        assert!((all_p99.min - 0.8e-3).abs() < 1e-9 && (all_p99.max - 2.4e-3).abs() < 1e-9);
        assert!(over_rounds(&rounds, Some(Kind::Sse), |(d, _)| d.p99).is_none());
    }

    #[test]
    fn requests_cycle_through_the_kinds_with_varied_timing() {
        let kinds: Vec<Kind> = (0..5).map(|i| request_of(i).0).collect();
        assert_eq!(
            kinds,
            [
                Kind::Ndjson,
                Kind::Ndjson,
                Kind::Ndjson,
                Kind::Sse,
                Kind::Whole
            ]
        );
        assert_eq!(request_of(2).1.api, Api::Generate);
        assert!(!request_of(4).1.stream);
        let timings: std::collections::BTreeSet<String> = (0..50).map(timing_of).collect();
        assert!(timings.len() > 40, "{timings:?}");
        for t in &timings {
            let n = |key: &str| -> u64 {
                t.split(", ")
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
                    .unwrap()
            };
            assert!((20..=50).contains(&n("first-token-ms")), "{t}");
            assert!((2..=5).contains(&n("token-ms")), "{t}");
            assert!((10..=30).contains(&n("tokens")), "{t}");
        }
    }
}
