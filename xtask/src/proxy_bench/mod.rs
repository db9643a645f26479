//! `cargo xtask bench proxy`: `observer proxy` against nginx as a plain reverse proxy, both in
//! front of the same fast upstream (a third nginx answering a small JSON body), all on this
//! machine. Measures throughput and latency under `wrk` in alternating rounds (median and
//! spread), resident memory with 1,000 open keep-alive connections, and the proxy's own request
//! count against wrk's. Prints markdown and rewrites the "Proxy against nginx" section of
//! `docs/BENCHMARKS.md`. It asserts nothing about speed; the figures are for a person to read.
//!
//! - `servers`: `observer proxy` (testkit's launcher) and its count (nginx, `wrk` and the
//!   `/proc` readings are in [`crate::common`]).
//! - `memory`: the idle keep-alive clients of the memory figure.
//! - `report`: the markdown of its section of `docs/BENCHMARKS.md`.

mod memory;
mod report;
mod servers;

use std::{fmt, net::SocketAddr, path::Path};

use anyhow::Context as _;

use crate::{
    common::{
        machine, nginx, parse_options,
        report::DocArgs,
        rounds,
        wrk::{self, WrkResult},
    },
    observer_run::release_binary,
};
use memory::Memory;
use testkit::observer::Proxy;
/// Seconds of `wrk` before each measured round, not measured.
const WARM_UP: u64 = 2;
const CONTENDERS: [&str; 2] = ["nginx", "observer"];

/// Options after `cargo xtask bench proxy --`.
#[derive(clap::Parser)]
#[command(name = "bench proxy")]
struct Options {
    #[command(flatten)]
    wrk: rounds::RoundArgs,
    /// Idle keep-alive connections held open for the memory figure.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    #[command(flatten)]
    doc: DocArgs,
}

/// One measured `wrk` run against one contender.
struct Round {
    /// Index into [`CONTENDERS`].
    contender: usize,
    wrk: WrkResult,
    /// CPU that processes other than the bench's used meanwhile, in cores.
    others_cores: f64,
    /// CPU the contender's processes used per completed request, in microseconds (their
    /// share of the loopback's kernel work included).
    cpu_us_per_request: f64,
    /// How much `observer_http_requests_total{role="gateway"}` rose (the observer's rounds).
    counted: Option<u64>,
}

pub fn run(workspace: &Path, args: &[String]) -> anyhow::Result<()> {
    let opts: Options = parse_options("bench proxy", args)?;
    machine::raise_fd_limit()?;
    let observer = release_binary(workspace)?;

    let upstream = nginx::start("upstream", nginx::upstream_conf())?;
    let upstream_addr = upstream.addr;
    let nginx = nginx::start("proxy", nginx::gateway_conf(upstream_addr))?;
    let proxy = servers::start(&observer, upstream_addr)?;
    println!(
        "upstream {upstream_addr}, nginx {}, observer proxy {}",
        nginx.addr, proxy.addr
    );
    let contenders = [(nginx.addr, nginx.pids()), (proxy.addr, vec![proxy.pid()])];

    let upstream_pids = upstream.pids();
    let (rounds, disturbed) = rounds::alternate(
        opts.wrk.rounds,
        CONTENDERS.len(),
        opts.wrk.retries,
        |contender| {
            let (addr, pids) = &contenders[contender];
            let counter = (contender == 1).then_some(&proxy);
            measure(&opts, contender, *addr, pids, &upstream_pids, counter)
        },
    )?;

    let memory = [
        Memory::measure(nginx.addr, &nginx.pids(), opts.idle)?,
        Memory::measure(proxy.addr, &[proxy.pid()], opts.idle)?,
    ];

    let text = report::markdown(&opts, &rounds, disturbed, &memory)?;
    opts.doc.publish(workspace, &text)
}

/// One measured round after a warm-up, once the machine is quiet; `counter` is the observer
/// proxy whose request counter to read around it.
fn measure(
    opts: &Options,
    contender: usize,
    addr: SocketAddr,
    pids: &[u32],
    upstream: &[u32],
    counter: Option<&Proxy>,
) -> anyhow::Result<Round> {
    machine::wait_for_quiet();
    wrk::run(addr, opts.wrk.connections, WARM_UP).context("warm-up")?;
    // Settled, so that requests cut at the end of the warm-up are not counted in the round.
    let before = counter.map(servers::settled_gateway_requests).transpose()?;
    let busy = || pids.iter().map(|&p| machine::process_busy(p)).sum::<f64>();
    let clock = machine::CpuClock::start(&[pids, upstream].concat());
    let started = busy();
    let wrk = wrk::run(addr, opts.wrk.connections, opts.wrk.seconds)?;
    let cpu_us_per_request = (busy() - started) * 1e6 / wrk.requests.max(1) as f64;
    let others_cores = clock.others_cores();
    let counted = match (counter, before) {
        (Some(proxy), Some(before)) => Some(servers::settled_gateway_requests(proxy)? - before),
        _ => None,
    };
    Ok(Round {
        contender,
        wrk,
        others_cores,
        cpu_us_per_request,
        counted,
    })
}

impl rounds::Disturbed for Round {
    fn others_cores(&self) -> f64 {
        self.others_cores
    }
}

impl fmt::Display for Round {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wrk = &self.wrk;
        write!(
            f,
            "{}: {:.0} requests/s, p50 {:.3} ms, p99 {:.3} ms, {} requests",
            CONTENDERS[self.contender],
            wrk.per_second,
            wrk.p50_us / 1e3,
            wrk.p99_us / 1e3,
            wrk.requests,
        )?;
        if let Some(counted) = self.counted {
            write!(f, " ({counted} counted)")?;
        }
        write!(
            f,
            ", {} errors, {:.1} µs CPU per request; others used {:.2} cores",
            wrk.errors, self.cpu_us_per_request, self.others_cores
        )
    }
}
