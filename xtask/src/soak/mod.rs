//! `cargo xtask soak --duration 10m`: the daemon under a steady chat workload with a fault
//! every minute, checking that it counts exactly and does not grow. nginx (the gateway) in
//! front of `observer sim`, `observer run` (release builds) watching both. Users on keep-alive
//! connections send a mix of Ollama and OpenAI requests ([`workload`]); every `--fault-every`
//! the next fault of a rotation strikes ([`faults`]); the daemon's RSS and gauges are sampled
//! meanwhile ([`sampling`]). At the end, once the workload has stopped and the daemon settled:
//! for every status, the responses the clients received (whole, or cut after the head) must
//! equal `observer_http_requests_total{role="gateway",code=...}`; in-flight must be back to 0
//! and `observer_tcp_connections_active` equal to the connections really open; the RSS slope
//! over the second half must stay under `--max-growth`. It prints why and exits non-zero
//! otherwise, after writing the section "Soak" of `docs/BENCHMARKS.md` ([`report`]).

mod faults;
mod report;
mod sampling;
mod workload;

use std::{
    collections::BTreeSet,
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;

use crate::{
    chat,
    common::{machine::raise_fd_limit, report::DocArgs},
    observer_run::{ObserverRun, WATCH_ONLY, release_binary},
};
use faults::{Fault, Probes, ROTATION, Target};
use sampling::{ROLES, Sample};
use testkit::{ledger::REQUESTS, metrics::Scrape, net::open_conns};
use workload::{Dice, Mix, Tally};

/// `observer sim`'s flags: a short model load after each (re)start, fixed seed.
const SIM_FLAGS: [&str; 4] = ["--load-ms", "200", "--seed", "7"];
/// How long the daemon may take, after the workload stops, to settle: in-flight back to 0,
/// its connection gauge equal to what is open, its counts still.
const SETTLE_WITHIN: Duration = Duration::from_secs(30);

/// Options after `cargo xtask soak --duration D`.
#[derive(Parser)]
#[command(name = "soak")]
struct Options {
    /// Concurrent users, each on its own keep-alive connection.
    #[arg(long, default_value_t = 8)]
    users: u64,
    /// Time between faults (`60s`, `1m`, `500ms`).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    fault_every: Duration,
    /// Time between samples of the daemon's memory and gauges.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    sample_every: Duration,
    /// Share of requests answered 500 by the simulator (`X-Sim-Fault: status=500`).
    #[arg(long, default_value_t = 0.02)]
    error_rate: f64,
    /// The faults, in the order they strike; to repeat one, name it alone.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = ROTATION)]
    faults: Vec<Fault>,
    /// The most RSS growth allowed over the second half (least-squares slope), KiB a minute.
    #[arg(long, default_value_t = 64.0)]
    max_growth: f64,
    #[command(flatten)]
    doc: DocArgs,
}

/// `90s`, `10m`, `1h`, `500ms`, or bare seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 10m, 1h or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("unknown unit {unit:?} in {text:?} (ms, s, m, h)")),
    }
}

/// A fault as it struck.
pub struct Struck {
    pub at_s: f64,
    pub fault: Fault,
    pub what: String,
}

/// The daemon once settled, and what is really open.
pub struct Settled {
    /// `/metrics` then.
    pub scrape: Scrape,
    pub sample: Sample,
    /// Connections open on the gateway's and the upstream's port.
    pub open: [usize; 2],
    /// Seconds it took (or [`SETTLE_WITHIN`], if it never did).
    pub after_s: f64,
    pub settled: bool,
}

/// Everything the report needs.
pub struct Soak {
    duration: Duration,
    users: u64,
    fault_every: Duration,
    sample_every: Duration,
    error_rate: f64,
    max_growth: f64,
    tally: Tally,
    probes: Probes,
    faults: Vec<Fault>,
    /// The options given, for the command line in the report.
    args: Vec<String>,
    struck: Vec<Struck>,
    samples: Vec<Sample>,
    settled: Settled,
}

pub fn run(workspace: &Path, duration: Duration, args: &[String]) -> anyhow::Result<()> {
    // `parse_from`: `--help` prints and exits, a bad option says why and exits 2.
    let opts = Options::parse_from(std::iter::once("soak").chain(args.iter().map(String::as_str)));
    if opts.users == 0 || opts.fault_every.is_zero() || opts.sample_every.is_zero() {
        bail!("--users, --fault-every and --sample-every must be more than zero");
    }
    if opts.faults.is_empty() {
        bail!("--faults names no fault");
    }
    raise_fd_limit()?;
    let binary = release_binary(workspace)?;
    let mut sim = chat::sim(&binary, &SIM_FLAGS)?;
    let mut gateway = chat::gateway("soak", sim.addr)?;
    let ports = [gateway.addr.port(), sim.addr.port()];
    let observer = ObserverRun::start(
        &binary,
        &[(ports[0], "gateway"), (ports[1], "upstream")],
        &WATCH_ONLY,
    )?;
    println!(
        "soak for {} s: {} users -> nginx {} -> observer sim {}; observer run on {}; a fault \
         every {} s",
        duration.as_secs(),
        opts.users,
        gateway.addr,
        sim.addr,
        observer.metrics,
        opts.fault_every.as_secs_f64()
    );

    let tally = Mutex::new(Tally::default());
    let mut probes = Probes::default();
    let stop_users = AtomicBool::new(false);
    let stop_sampling = AtomicBool::new(false);
    let mix = Mix {
        error_rate: opts.error_rate,
    };
    let started = Instant::now();
    let (struck, samples, settled) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            sampling::sample_until(&observer, started, opts.sample_every, &stop_sampling)
        });
        let addr = gateway.addr;
        let users: Vec<_> = (0..opts.users)
            .map(|id| {
                let (tally, stop) = (&tally, &stop_users);
                scope.spawn(move || workload::user(id, addr, mix, tally, stop))
            })
            .collect();
        let mut target = Target {
            gateway: &mut gateway,
            sim: &mut sim,
            tally: &tally,
            probes: &mut probes,
            dice: &mut Dice::new(0xFA017),
        };
        let struck = strike(
            &mut target,
            &opts.faults,
            started,
            duration,
            opts.fault_every,
        );
        stop_users.store(true, Ordering::Relaxed);
        for user in users {
            user.join().expect("a user does not panic");
        }
        let settled = settle(&observer, ports, started);
        stop_sampling.store(true, Ordering::Relaxed);
        let samples = sampler.join().expect("the sampler does not panic");
        (struck, samples, settled)
    });
    let struck = struck?;
    let settled = settled?;
    observer.stop()?;

    let soak = Soak {
        duration,
        users: opts.users,
        fault_every: opts.fault_every,
        sample_every: opts.sample_every,
        error_rate: opts.error_rate,
        max_growth: opts.max_growth,
        tally: tally.into_inner().expect("no panics hold it"),
        probes,
        faults: opts.faults.clone(),
        args: args.to_vec(),
        struck,
        samples,
        settled,
    };
    let failures = soak.failures();
    opts.doc
        .publish(workspace, &report::markdown(&soak, &failures))?;
    if !failures.is_empty() {
        bail!("the soak failed:\n- {}", failures.join("\n- "));
    }
    println!("the soak passed");
    Ok(())
}

/// The command that runs this soak again (the doc options left out).
fn command_line(duration: Duration, args: &[String]) -> String {
    let secs = duration.as_secs();
    let duration = if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    };
    let mut kept = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--no-doc" => {}
            "--doc" => {
                args.next();
            }
            a if a.starts_with("--doc=") => {}
            a => kept.push(a),
        }
    }
    let mut line = format!("cargo xtask soak --duration {duration}");
    if !kept.is_empty() {
        line += " -- ";
        line += &kept.join(" ");
    }
    line
}

/// `faults` in rotation every `every` until `duration` has passed since `started`, the first
/// half a period in (so that a soak of N periods has N faults, none at its very end).
fn strike(
    target: &mut Target<'_>,
    faults: &[Fault],
    started: Instant,
    duration: Duration,
    every: Duration,
) -> anyhow::Result<Vec<Struck>> {
    let end = started + duration;
    let mut struck = Vec::new();
    let mut next = started + every / 2;
    for fault in faults.iter().cycle() {
        if next >= end {
            break;
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let at_s = started.elapsed().as_secs_f64();
        let what = fault
            .inject(target)
            .with_context(|| format!("fault at {at_s:.0} s: {fault}"))?;
        println!("{at_s:>6.0} s  fault: {fault}: {what}");
        struck.push(Struck {
            at_s,
            fault: *fault,
            what,
        });
        next += every;
    }
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    Ok(struck)
}

/// Waits until in-flight is 0 for both roles, the connection gauges equal the connections open
/// on each port, and the gateway's request count is still between two readings; or
/// [`SETTLE_WITHIN`].
fn settle(observer: &ObserverRun, ports: [u16; 2], started: Instant) -> anyhow::Result<Settled> {
    let from = Instant::now();
    let mut last: Option<Sample> = None;
    loop {
        let scrape = observer.scrape()?;
        let sample = Sample::read(observer, started)?;
        let open = ports.map(|port| open_conns(port) as usize);
        let settled = sample.in_flight == [0.0; 2]
            && sample.connections == open.map(|n| n as f64)
            && last.is_some_and(|l| l.requests == sample.requests);
        if settled || from.elapsed() > SETTLE_WITHIN {
            return Ok(Settled {
                scrape,
                sample,
                open,
                after_s: from.elapsed().as_secs_f64(),
                settled,
            });
        }
        last = Some(sample);
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The values of `label` among the series of `name` with `role`.
fn label_values(scrape: &Scrape, name: &str, role: &str, label: &str) -> BTreeSet<String> {
    scrape
        .series(name, &[("role", role)])
        .filter_map(|(labels, _)| labels.get(label).cloned())
        .collect()
}

impl Soak {
    /// The observer's gateway count for `code` (`"200"`, `"none"`, ...).
    fn observed(&self, role: &str, code: &str) -> u64 {
        self.settled
            .scrape
            .sum(REQUESTS, &[("role", role), ("code", code)]) as u64
    }

    /// Every status either side saw on the gateway, `none` left out.
    fn codes(&self) -> Vec<String> {
        let mut codes = label_values(&self.settled.scrape, REQUESTS, "gateway", "code");
        codes.extend(self.tally.codes().iter().map(u16::to_string));
        codes.remove("none");
        codes.into_iter().collect()
    }

    /// (code, the clients' responses with it, the observer's count) for every status.
    fn by_code(&self) -> Vec<(String, u64, u64)> {
        self.codes()
            .into_iter()
            .map(|code| {
                let client = code.parse().map_or(0, |c| self.tally.responses(c));
                let observed = self.observed("gateway", &code);
                (code, client, observed)
            })
            .collect()
    }

    /// What the observer should count as `code="none"` at the gateway: the clients' requests
    /// that got no response, and the half-open requests with a whole head.
    fn none_expected(&self) -> u64 {
        self.tally.gateway.get("none") + self.probes.abandoned_with_head
    }

    /// What the observer should count as `done_reason="incomplete"`: every client request
    /// (each names a model) that reached the gateway and got no whole response. The half-open
    /// bodies are cut before the model's name.
    fn incomplete_expected(&self) -> u64 {
        self.tally.incomplete()
    }

    fn rss_slope(&self) -> Option<f64> {
        sampling::rss_slope_second_half(&self.samples)
    }

    /// Why the soak fails; empty when it passes.
    fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if self.tally.complete.get(&200).is_none_or(|&n| n == 0) {
            failures.push("no request completed with 200: the workload did not run".to_owned());
        }
        for (code, client, observed) in self.by_code() {
            if client != observed {
                failures.push(format!(
                    "code {code}: the clients received {client} responses, the observer counted \
                     {observed} ({:+})",
                    observed as i64 - client as i64
                ));
            }
        }
        let s = &self.settled;
        for (i, role) in ROLES.iter().enumerate() {
            if s.sample.in_flight[i] != 0.0 {
                failures.push(format!(
                    "{role}: {} requests still in flight after the workload stopped",
                    s.sample.in_flight[i]
                ));
            }
            if s.sample.connections[i] != s.open[i] as f64 {
                failures.push(format!(
                    "{role}: observer_tcp_connections_active is {} while {} connections are open",
                    s.sample.connections[i], s.open[i]
                ));
            }
        }
        if s.sample.lost > 0.0 {
            failures.push(format!(
                "{} events lost: counts cannot be exact (see observer_ebpf_events_lost_total)",
                s.sample.lost
            ));
        }
        match self.rss_slope() {
            Some(slope) if slope > self.max_growth => failures.push(format!(
                "RSS grew {slope:.1} KiB/min over the second half (bound {} KiB/min)",
                self.max_growth
            )),
            Some(_) => {}
            None => failures.push("too few memory samples to fit a slope".to_owned()),
        }
        failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_the_usual_units() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn the_command_line_leaves_the_doc_options_out() {
        let args = [
            "--fault-every",
            "30s",
            "--no-doc",
            "--doc",
            "x.md",
            "--users=4",
        ];
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        assert_eq!(
            command_line(Duration::from_secs(180), &args),
            "cargo xtask soak --duration 3m -- --fault-every 30s --users=4"
        );
        assert_eq!(
            command_line(Duration::from_secs(90), &[]),
            "cargo xtask soak --duration 90s"
        );
    }

    #[test]
    fn label_values_of_one_role() {
        let text = "observer_http_requests_total{role=\"gateway\",code=\"200\"} 5\n\
                    observer_http_requests_total{role=\"gateway\",code=\"none\"} 1\n\
                    observer_http_requests_total{role=\"upstream\",code=\"502\"} 1\n\
                    observer_http_requests_total_created{role=\"gateway\",code=\"404\"} 1\n";
        let codes = label_values(&Scrape::parse(text), REQUESTS, "gateway", "code");
        assert_eq!(codes.into_iter().collect::<Vec<_>>(), ["200", "none"]);
    }
}
