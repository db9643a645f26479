//! `cargo xtask bench overhead`: what attaching `observer run` costs the traffic it watches.
//! nginx as the gateway (2 workers, upstream keep-alive) in front of the fast upstream nginx,
//! on free ports; two contenders measured in alternating rounds: no observer, and `observer
//! run --watch GW=gateway --watch UP=upstream --no-probe --gpu off` (release build).
//!
//! The daemon is started before each of its rounds and stopped after: its kernel programs
//! hook every process's socket calls while attached, so a daemon kept across rounds would tax
//! the "no observer" rounds too. Each round then begins with a warm-up under the same load, so
//! the start-up (loading and attaching the programs, seeding from `/proc`) is not measured.
//!
//! Two comparisons: `wrk -t2 -c64 -d10s --latency` (closed loop, saturating the 2 cores:
//! throughput and p50/p99, ratios observer / none), then a fixed rate ([`crate::rate`], open
//! loop, 2,000 requests/s): the p50 added per request, and the daemon's CPU per 1,000
//! requests. In the fixed-rate rounds the daemon's gateway and upstream counts must equal the
//! generator's completed responses exactly; under wrk, whose last requests are cut and not
//! counted, only the difference is reported.
//!
//! `report` writes the markdown of the section "Observer overhead".

mod report;

use std::{fmt, path::Path, time::Duration};

use anyhow::Context as _;

use crate::{
    common::{
        PATH,
        machine::{self, CpuClock},
        nginx::Gateway,
        parse_options,
        report::DocArgs,
        rounds::{self, Disturbed},
        wrk::{self, WrkResult},
    },
    observer_run::{ObserverRun, WATCH_ONLY, counts, release_binary, settled},
    rate::{self, RateConfig, RateResult},
};

const CONTENDERS: [&str; 2] = ["none", "observer"];
/// Seconds of the same load before each measured round, not measured.
const WARM_UP: u64 = 2;

/// Options after `cargo xtask bench overhead --`.
#[derive(clap::Parser)]
#[command(name = "bench overhead")]
struct Options {
    /// Rounds per contender (in each comparison), wrk's seconds and connections.
    #[command(flatten)]
    wrk: rounds::RoundArgs,
    /// Requests per second of the fixed-rate comparison.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Seconds per fixed-rate round (default: as --seconds).
    #[arg(long)]
    rate_seconds: Option<u64>,
    /// Keep-alive connections of the fixed-rate generator (one thread each).
    #[arg(long, default_value_t = 16)]
    rate_connections: usize,
    #[command(flatten)]
    doc: DocArgs,
}

impl Options {
    fn rate_seconds(&self) -> u64 {
        self.rate_seconds.unwrap_or(self.wrk.seconds)
    }
}

/// The load of one round.
enum Load {
    Wrk(WrkResult),
    Rate(RateResult),
}

impl Load {
    fn completed(&self) -> u64 {
        match self {
            Load::Wrk(w) => w.requests,
            Load::Rate(r) => r.completed(),
        }
    }
}

/// The daemon's side of an observer round.
struct Observed {
    /// Its CPU over the round, in seconds.
    cpu_s: f64,
    /// How much the gateway's and the upstream's request counts rose.
    gateway: u64,
    upstream: u64,
    /// Events lost since it started, all kinds.
    lost: u64,
}

/// One measured round of one contender.
struct Round {
    /// Index into [`CONTENDERS`].
    contender: usize,
    load: Load,
    /// CPU of the nginx processes (gateway and upstream, the kernel programs' work in their
    /// system calls included) per completed request, in microseconds.
    nginx_us_per_request: f64,
    /// CPU that processes other than the bench's used meanwhile, in cores.
    others_cores: f64,
    observed: Option<Observed>,
}

impl Disturbed for Round {
    fn others_cores(&self) -> f64 {
        self.others_cores
    }
}

pub fn run(workspace: &Path, args: &[String]) -> anyhow::Result<()> {
    let opts: Options = parse_options("bench overhead", args)?;
    machine::raise_fd_limit()?;
    let binary = release_binary(workspace)?;
    let gateway = Gateway::start()?;

    println!(
        "wrk: -t2 -c{} -d{}s",
        opts.wrk.connections, opts.wrk.seconds
    );
    let (wrk_rounds, wrk_again) =
        rounds::alternate(opts.wrk.rounds, CONTENDERS.len(), opts.wrk.retries, |c| {
            measure(&binary, &gateway, c, |warm_up| {
                let seconds = if warm_up { WARM_UP } else { opts.wrk.seconds };
                Ok(Load::Wrk(wrk::run(
                    gateway.gateway.addr,
                    opts.wrk.connections,
                    seconds,
                )?))
            })
        })?;

    println!(
        "fixed rate: {} requests/s over {} connections, {} s",
        opts.rate,
        opts.rate_connections,
        opts.rate_seconds()
    );
    let config = RateConfig {
        addr: gateway.gateway.addr,
        path: PATH.to_owned(),
        rate: opts.rate,
        duration: Duration::from_secs(opts.rate_seconds()),
        connections: opts.rate_connections,
    };
    let (rate_rounds, rate_again) =
        rounds::alternate(opts.wrk.rounds, CONTENDERS.len(), opts.wrk.retries, |c| {
            measure(&binary, &gateway, c, |warm_up| {
                let config = RateConfig {
                    duration: if warm_up {
                        Duration::from_secs(WARM_UP)
                    } else {
                        config.duration
                    },
                    ..config.clone()
                };
                Ok(Load::Rate(rate::run(&config)?))
            })
        })?;

    let text = report::markdown(
        &opts,
        &report::Measured {
            wrk: &wrk_rounds,
            rate: &rate_rounds,
            again: wrk_again + rate_again,
        },
    )?;
    opts.doc.publish(workspace, &text)
}

/// One round of `contender` once the machine is quiet: the observer started (contender 1),
/// `load(true)` as a warm-up, `load(false)` measured, the observer stopped.
fn measure(
    binary: &Path,
    gateway: &Gateway,
    contender: usize,
    mut load: impl FnMut(bool) -> anyhow::Result<Load>,
) -> anyhow::Result<Round> {
    machine::wait_for_quiet();
    let observer = (contender == 1)
        .then(|| ObserverRun::start(binary, &gateway.watch(), &WATCH_ONLY))
        .transpose()?;
    load(true).context("warm-up")?;
    // Settled, so that requests finishing after the warm-up are not counted in the round.
    let before = observer
        .as_ref()
        .map(|o| settled(|| counts(o)))
        .transpose()?;
    let nginx = gateway.pids();
    let daemon: Vec<u32> = observer.iter().map(ObserverRun::pid).collect();
    let busy = |pids: &[u32]| pids.iter().map(|&p| machine::process_busy(p)).sum::<f64>();
    let clock = CpuClock::start(&[&nginx[..], &daemon, &[std::process::id()]].concat());
    let (nginx_before, daemon_before) = (busy(&nginx), busy(&daemon));
    let measured = load(false)?;
    let (nginx_cpu, daemon_cpu) = (busy(&nginx) - nginx_before, busy(&daemon) - daemon_before);
    let others_cores = clock.others_cores();
    let observed = match (&observer, before) {
        (Some(o), Some(before)) => {
            let after = settled(|| counts(o))?;
            Some(Observed {
                cpu_s: daemon_cpu,
                gateway: after.gateway.saturating_sub(before.gateway),
                upstream: after.upstream.saturating_sub(before.upstream),
                lost: after.lost_total(),
            })
        }
        _ => None,
    };
    if let Some(observer) = observer {
        observer.stop()?;
    }
    Ok(Round {
        contender,
        nginx_us_per_request: nginx_cpu * 1e6 / measured.completed().max(1) as f64,
        load: measured,
        others_cores,
        observed,
    })
}

impl fmt::Display for Round {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", CONTENDERS[self.contender])?;
        match &self.load {
            Load::Wrk(w) => write!(
                f,
                "{:.0} requests/s, p50 {:.3} ms, p99 {:.3} ms, {} requests, {} errors",
                w.per_second,
                w.p50_us / 1e3,
                w.p99_us / 1e3,
                w.requests,
                w.errors
            )?,
            Load::Rate(r) => write!(
                f,
                "{:.0} requests/s, p50 {:.1} µs ({:.1} from send), p99 {:.1} µs, {} completed ({}), {} failed, {} unsent",
                r.achieved_rate(),
                r.latency_from_schedule_us(50.0),
                r.latency_from_send_us(50.0),
                r.latency_from_schedule_us(99.0),
                r.completed(),
                r.statuses(),
                r.failed,
                r.unsent
            )?,
        }
        write!(
            f,
            "; nginx {:.1} µs CPU per request",
            self.nginx_us_per_request
        )?;
        if let Some(o) = &self.observed {
            write!(
                f,
                "; observer counted gateway {} upstream {}, lost {}, CPU {:.3} s",
                o.gateway, o.upstream, o.lost, o.cpu_s
            )?;
        }
        write!(f, "; others used {:.2} cores", self.others_cores)
    }
}
