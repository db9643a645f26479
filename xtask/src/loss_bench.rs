//! `cargo xtask bench loss`: a steady 10,000 requests/s for 60 s through nginx (the gateway,
//! 2 workers, upstream keep-alive, in front of the fast upstream) with `observer run` watching
//! both ports. Every `observer_ebpf_events_lost_total` kind must stay 0, and the gateway's and
//! the upstream's `observer_http_requests_total` must each rise by exactly the responses the
//! load generator ([`crate::rate`], open loop) completed. Also reports the rate achieved, the
//! daemon's CPU and its memory. A miss is printed and written as such, never hidden; the run
//! still succeeds so that the other benchmarks run.

use std::{
    fmt::Write as _,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    common::{
        PATH,
        machine::{self, CpuClock},
        nginx::Gateway,
        parse_options,
        report::{DocArgs, finish, grouped, latency, machine as machine_line, mib, paragraph},
    },
    observer_run::{Counts, ObserverRun, WATCH_ONLY, counts, release_binary, rss_kib, settled},
    rate::{self, RateConfig, RateResult},
};

pub const SECTION: &str = "## Loss at 10,000 requests/s";
/// Seconds of load before the measured run, at the same rate, not counted.
const WARM_UP: u64 = 2;

/// Options after `cargo xtask bench loss --`.
#[derive(clap::Parser)]
#[command(name = "bench loss")]
struct Options {
    /// Requests per second.
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// Seconds of load.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Keep-alive connections of the load generator (one thread each).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// One more flag for `observer run` (repeatable), e.g. `--observer-arg=--ring-bytes=33554432`.
    #[arg(long = "observer-arg", value_name = "ARG", allow_hyphen_values = true)]
    observer_args: Vec<String>,
    #[command(flatten)]
    doc: DocArgs,
}

/// What the measured run gave.
struct Outcome {
    load: RateResult,
    before: Counts,
    after: Counts,
    /// The daemon's CPU over the run, in seconds.
    cpu_s: f64,
    /// CPU that other processes used meanwhile, in cores.
    others_cores: f64,
    /// CPU of the load generator (this process) and of nginx (both, all processes) over the
    /// run, in cores.
    generator_cores: f64,
    nginx_cores: f64,
    /// VmRSS sampled every second during the run: min and max, and after the run.
    rss_kib: (u64, u64, u64),
    peak_kib: u64,
}

impl Outcome {
    fn exact(&self) -> bool {
        let completed = Some(self.load.completed());
        self.after.gateway.checked_sub(self.before.gateway) == completed
            && self.after.upstream.checked_sub(self.before.upstream) == completed
    }

    fn met(&self) -> bool {
        self.exact()
            && self.after.lost_total() == 0
            && self.load.failed == 0
            && self.load.unsent == 0
    }
}

pub fn run(workspace: &Path, args: &[String]) -> anyhow::Result<()> {
    let opts: Options = parse_options("bench loss", args)?;
    machine::raise_fd_limit()?;
    let binary = release_binary(workspace)?;
    let gateway = Gateway::start()?;
    machine::wait_for_quiet();
    let flags: Vec<&str> = WATCH_ONLY
        .into_iter()
        .chain(opts.observer_args.iter().map(String::as_str))
        .collect();
    let observer = ObserverRun::start(&binary, &gateway.watch(), &flags)?;
    let outcome = measure(&opts, &gateway, &observer)?;
    observer.stop()?;

    println!(
        "{}",
        if outcome.met() {
            "loss: no event lost, counts exact"
        } else {
            "loss: TARGET MISSED (see the figures below)"
        }
    );
    let text = markdown(&opts, &outcome)?;
    opts.doc.publish(workspace, &text)
}

fn measure(opts: &Options, gateway: &Gateway, observer: &ObserverRun) -> anyhow::Result<Outcome> {
    let config = RateConfig {
        addr: gateway.gateway.addr,
        path: PATH.to_owned(),
        rate: opts.rate,
        duration: Duration::from_secs(WARM_UP),
        connections: opts.connections,
    };
    let warm = rate::run(&config).context("warm-up")?;
    println!(
        "warm-up: {} responses at {:.0}/s",
        warm.completed(),
        warm.achieved_rate()
    );
    let before = settled(|| counts(observer))?;
    let pid = observer.pid();
    let clock = CpuClock::start(&[gateway.pids(), vec![pid, std::process::id()]].concat());
    let cpu_before = machine::process_busy(pid);
    let nginx_busy = || {
        gateway
            .pids()
            .iter()
            .map(|&p| machine::process_busy(p))
            .sum::<f64>()
    };
    let (generator_before, nginx_before) =
        (machine::process_busy(std::process::id()), nginx_busy());

    let done = AtomicBool::new(false);
    let (load, samples) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) {
                samples.extend(rss_kib(observer).ok());
                let until = Instant::now() + Duration::from_secs(1);
                while Instant::now() < until && !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            samples
        });
        let load = rate::run(&RateConfig {
            duration: Duration::from_secs(opts.seconds),
            ..config.clone()
        });
        done.store(true, Ordering::Relaxed);
        (load, sampler.join().expect("the memory sampler panicked"))
    });
    let load = load?;
    let cpu_s = machine::process_busy(pid) - cpu_before;
    let generator_cores =
        (machine::process_busy(std::process::id()) - generator_before) / opts.seconds as f64;
    let nginx_cores = (nginx_busy() - nginx_before) / opts.seconds as f64;
    let others_cores = clock.others_cores();
    let after = settled(|| counts(observer))?;
    let rss_after = rss_kib(observer)?;
    let outcome = Outcome {
        rss_kib: (
            samples.iter().copied().min().unwrap_or(rss_after),
            samples.iter().copied().max().unwrap_or(rss_after),
            rss_after,
        ),
        peak_kib: machine::proc_kib(pid, "status", "VmHWM:")?,
        load,
        before,
        after,
        cpu_s,
        others_cores,
        generator_cores,
        nginx_cores,
    };
    let l = &outcome.load;
    println!(
        "loss: {} sent ({} unsent, {} failed) at {:.0}/s, {} completed ({}); observer: gateway {:+}, upstream {:+}, lost {}; daemon {:.3} s CPU; others used {:.2} cores",
        l.sent,
        l.unsent,
        l.failed,
        l.achieved_rate(),
        l.completed(),
        l.statuses(),
        outcome.after.gateway as i64 - outcome.before.gateway as i64,
        outcome.after.upstream as i64 - outcome.before.upstream as i64,
        outcome.after.lost_total(),
        cpu_s,
        others_cores
    );
    Ok(outcome)
}

fn markdown(opts: &Options, o: &Outcome) -> anyhow::Result<String> {
    let l = &o.load;
    let completed = l.completed();
    let seconds = opts.seconds as f64;
    let delta = |after: u64, before: u64| after as i64 - before as i64;
    let gw = delta(o.after.gateway, o.before.gateway);
    let up = delta(o.after.upstream, o.before.upstream);
    let mut s = format!("{SECTION}\n\n");
    s += &paragraph(&format!(
        "`xtask/src/loss_bench.rs`: an open-loop load generator (`xtask/src/rate.rs`: {} keep-alive \
         connections, one thread each, requests paced on a fixed schedule, no pipelining) sends \
         `GET {PATH}` at {} requests/s for {} s through nginx as the gateway (`worker_processes \
         2`, upstream keep-alive) to the fast upstream nginx of the proxy benchmark, with \
         `observer run --watch GW=gateway --watch UP=upstream {}` (release build) attached, after \
         a {WARM_UP} s warm-up at the same rate. When the run ends every request sent has its \
         response, so the generator's count is exact. Targets: no event lost (every \
         `observer_ebpf_events_lost_total` kind 0 since the daemon started), and the gateway's and \
         the upstream's `observer_http_requests_total` each rise by exactly the responses \
         completed (read once they stop changing).",
        opts.connections,
        grouped(opts.rate as u64),
        opts.seconds,
        [
            &WATCH_ONLY[..],
            &opts
                .observer_args
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        ]
        .concat()
        .join(" ")
    ));
    s += "```sh\ncargo xtask bench loss   # -- --rate R --seconds S --connections C --observer-arg=--ring-bytes=N --no-doc --doc PATH\n```\n\n";
    s += &paragraph(&machine_line());
    s += "| what | figure |\n|---|---|\n";
    writeln!(
        s,
        "| requests scheduled / sent / completed | {} / {} / {} ({}; {} failed, {} not sent in time) |",
        grouped(l.scheduled),
        grouped(l.sent),
        grouped(completed),
        l.statuses(),
        l.failed,
        l.unsent
    )?;
    writeln!(
        s,
        "| rate achieved | {} requests/s (target {}); latency from the scheduled send p50 {}, p99 {}, p99.9 {}; latest send {} behind schedule |",
        grouped(l.achieved_rate().round() as u64),
        grouped(opts.rate as u64),
        latency(l.latency_from_schedule_us(50.0)),
        latency(l.latency_from_schedule_us(99.0)),
        latency(l.latency_from_schedule_us(99.9)),
        latency(l.max_send_lag.as_secs_f64() * 1e6)
    )?;
    let verdict = |n: i64| {
        if n == completed as i64 {
            "**exact**".to_owned()
        } else {
            format!("**{:+}**", n - completed as i64)
        }
    };
    writeln!(
        s,
        "| `observer_http_requests_total{{role=\"gateway\"}}` rose by | {} ({}) |",
        grouped(gw.max(0) as u64),
        verdict(gw)
    )?;
    writeln!(
        s,
        "| `observer_http_requests_total{{role=\"upstream\"}}` rose by | {} ({}) |",
        grouped(up.max(0) as u64),
        verdict(up)
    )?;
    let lost: Vec<String> = o
        .after
        .lost
        .iter()
        .map(|(kind, v)| format!("`{kind}` {v}"))
        .collect();
    writeln!(
        s,
        "| events lost since the daemon started | **{}** ({}) |",
        o.after.lost_total(),
        lost.join(", ")
    )?;
    let parse: Vec<String> = o
        .after
        .parse_errors
        .iter()
        .map(|(k, v)| format!("`{k}` {v}"))
        .collect();
    writeln!(
        s,
        "| parse errors | {} |",
        if parse.is_empty() {
            "none".to_owned()
        } else {
            parse.join(", ")
        }
    )?;
    writeln!(
        s,
        "| ring buffer events read | {} ({}/s) |",
        grouped(o.after.events.saturating_sub(o.before.events)),
        grouped(((o.after.events.saturating_sub(o.before.events)) as f64 / seconds) as u64)
    )?;
    writeln!(
        s,
        "| daemon CPU | {:.3} s over the run: {:.1} % of a core, {:.1} ms per 1,000 requests |",
        o.cpu_s,
        o.cpu_s / seconds * 100.0,
        o.cpu_s * 1e3 / (completed.max(1) as f64 / 1e3)
    )?;
    writeln!(
        s,
        "| daemon RSS | {}–{} during the run (sampled every second), {} after, peak (`VmHWM`, start-up included) {} |",
        mib(o.rss_kib.0),
        mib(o.rss_kib.1),
        mib(o.rss_kib.2),
        mib(o.peak_kib)
    )?;
    writeln!(
        s,
        "| CPU of the rest, in cores | load generator {:.2}, nginx (gateway and upstream) {:.2}, other processes {:.2} |\n",
        o.generator_cores, o.nginx_cores, o.others_cores
    )?;
    s += &paragraph(if o.met() {
        "Result: targets met — no event lost, and both counts equal the generator's."
    } else {
        "Result: **target missed** — see the rows in bold; the daemon's log and \
         `observer_ebpf_events_lost_total` say which stage dropped what."
    });
    Ok(finish(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(gateway: u64, lost: u64) -> Outcome {
        let load = RateResult {
            scheduled: 1000,
            sent: 1000,
            by_status: [(200, 1000)].into(),
            send_window: Duration::from_millis(999),
            from_schedule_ns: (1..=1000).map(|i| i * 1000).collect(),
            ..RateResult::default()
        };
        let counts = |gateway, upstream, lost| Counts {
            gateway,
            upstream,
            lost: vec![("data".to_owned(), lost), ("conn".to_owned(), 0)],
            parse_errors: vec![],
            events: 0,
        };
        Outcome {
            load,
            before: counts(20, 20, 0),
            after: counts(20 + gateway, 1020, lost),
            cpu_s: 0.5,
            others_cores: 0.0,
            generator_cores: 0.3,
            nginx_cores: 0.4,
            rss_kib: (30 * 1024, 31 * 1024, 31 * 1024),
            peak_kib: 32 * 1024,
        }
    }

    #[test]
    fn reads_its_options() {
        let o: Options = parse_options("bench loss", &["--seconds".into(), "15".into()]).unwrap();
        assert!(o.observer_args.is_empty());
        assert_eq!(
            (o.rate, o.seconds, o.connections, o.doc.no_doc),
            (10_000.0, 15, 16, false)
        );
        assert!(parse_options::<Options>("bench loss", &["--rounds".into(), "2".into()]).is_err());
        let args = [
            "--observer-arg",
            "--ring-bytes",
            "--observer-arg=--log=info",
        ]
        .map(String::from);
        let o: Options = parse_options("bench loss", &args).unwrap();
        assert_eq!(o.observer_args, ["--ring-bytes", "--log=info"]);
    }

    #[test]
    fn says_exact_counts_and_no_loss_when_met() {
        let opts: Options = parse_options("bench loss", &["--seconds".into(), "1".into()]).unwrap();
        let o = outcome(1000, 0);
        assert!(o.met());
        let s = markdown(&opts, &o).unwrap();
        assert!(s.contains("rose by | 1,000 (**exact**) |"), "{s}");
        assert!(s.contains("| **0** (`data` 0, `conn` 0) |"), "{s}");
        assert!(s.contains("500.0 ms per 1,000 requests"), "{s}");
        assert!(s.contains("Result: targets met"), "{s}");
    }

    #[test]
    fn shows_a_miss_and_a_loss() {
        let opts: Options = parse_options("bench loss", &["--seconds".into(), "1".into()]).unwrap();
        let o = outcome(997, 4);
        assert!(!o.met());
        let s = markdown(&opts, &o).unwrap();
        assert!(s.contains("rose by | 997 (**-3**) |"), "{s}");
        assert!(s.contains("| **4** (`data` 4, `conn` 0) |"), "{s}");
        assert!(s.contains("**target missed**"), "{s}");
        assert!(!outcome(1000, 1).met(), "a loss alone misses");
    }
}
