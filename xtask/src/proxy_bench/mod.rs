//! `cargo xtask bench proxy`: `observer proxy` against nginx as a plain reverse proxy, both in
//! front of the same fast upstream (a third nginx answering a small JSON body), all on this
//! machine. Measures throughput and latency under `wrk` in alternating rounds (median and
//! spread), resident memory with 1,000 open keep-alive connections, and the proxy's own request
//! count against wrk's. Prints markdown and rewrites the "Proxy against nginx" section of
//! `docs/BENCHMARKS.md`. It asserts nothing about speed; the figures are for a person to read.
//!
//! - `servers`: the upstream, nginx and `observer proxy`; each is stopped when its guard drops,
//!   on error too.
//! - `load`: `wrk` runs, and the idle keep-alive clients of the memory figure.
//! - `machine`: `/proc` readings (memory, sockets, CPU time) and the open-files limit.
//! - `report`: the markdown, and its section of `docs/BENCHMARKS.md`.

mod load;
mod machine;
mod report;
mod servers;

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::Parser;

use load::{Memory, WrkResult};
use servers::{Nginx, ObserverProxy};

/// The request every client sends: what an Ollama client asks most, with a small answer.
const PATH: &str = "/api/tags";
/// Seconds of `wrk` before each measured round, not measured.
const WARM_UP: u64 = 2;
const CONTENDERS: [&str; 2] = ["nginx", "observer"];
/// A round during which other processes used more than this many cores is run again, up to
/// [`RETRIES`] times: builds and tests of others on a shared machine.
const DISTURBED_CORES: f64 = 0.15;
const RETRIES: usize = 3;

/// Options after `cargo xtask bench proxy --`.
#[derive(Parser)]
#[command(name = "bench proxy")]
struct Options {
    /// Measured rounds per contender (they alternate: nginx, observer, nginx, ...). Five: on
    /// this shared 2-core machine one round in five can run 10-20 % slow for either side.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per measured round.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// wrk's connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Idle keep-alive connections held open for the memory figure.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Print the figures without rewriting docs/BENCHMARKS.md.
    #[arg(long)]
    no_doc: bool,
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
    let opts = Options::try_parse_from(
        std::iter::once("bench proxy").chain(args.iter().map(String::as_str)),
    )?;
    machine::raise_fd_limit()?;
    let observer = build_observer(workspace)?;

    let upstream = Nginx::start("upstream", servers::upstream_conf)?;
    let upstream_addr = upstream.addr;
    let nginx = Nginx::start("proxy", |port| servers::proxy_conf(port, upstream_addr))?;
    let proxy = ObserverProxy::start(&observer, upstream_addr)?;
    println!(
        "upstream {upstream_addr}, nginx {}, observer proxy {}",
        nginx.addr, proxy.addr
    );
    let contenders = [(nginx.addr, nginx.pids()), (proxy.addr, vec![proxy.pid()])];

    let mut rounds = Vec::new();
    let mut disturbed = 0;
    for round in 1..=opts.rounds {
        for (contender, (addr, pids)) in contenders.iter().enumerate() {
            let upstream = upstream.pids();
            let counter = (contender == 1).then_some(&proxy);
            for attempt in 0..=RETRIES {
                let measured = measure(&opts, contender, *addr, pids, &upstream, counter)?;
                println!("round {round} {measured}");
                if measured.others_cores <= DISTURBED_CORES || attempt == RETRIES {
                    rounds.push(measured);
                    break;
                }
                println!("  other processes used the machine meanwhile; again");
                disturbed += 1;
            }
        }
    }

    let memory = [
        Memory::measure(nginx.addr, &nginx.pids(), opts.idle)?,
        Memory::measure(proxy.addr, &[proxy.pid()], opts.idle)?,
    ];

    let text = report::markdown(&opts, &rounds, disturbed, &memory)?;
    println!("\n{text}");
    if !opts.no_doc {
        let doc = workspace.join("docs/BENCHMARKS.md");
        report::replace_section(&doc, &text)?;
        println!(
            "wrote the section \"{}\" of {}",
            report::SECTION,
            doc.display()
        );
    }
    Ok(())
}

/// One measured round after a warm-up, once the machine is quiet; `counter` is the observer
/// proxy whose request counter to read around it.
fn measure(
    opts: &Options,
    contender: usize,
    addr: SocketAddr,
    pids: &[u32],
    upstream: &[u32],
    counter: Option<&ObserverProxy>,
) -> anyhow::Result<Round> {
    machine::wait_for_quiet();
    load::wrk(addr, opts.connections, WARM_UP).context("warm-up")?;
    // Settled, so that requests cut at the end of the warm-up are not counted in the round.
    let before = counter
        .map(ObserverProxy::settled_gateway_requests)
        .transpose()?;
    let busy = || pids.iter().map(|&p| machine::process_busy(p)).sum::<f64>();
    let clock = machine::CpuClock::start(&[pids, upstream].concat());
    let started = busy();
    let wrk = load::wrk(addr, opts.connections, opts.seconds)?;
    let cpu_us_per_request = (busy() - started) * 1e6 / wrk.requests.max(1) as f64;
    let others_cores = clock.others_cores();
    let counted = match (counter, before) {
        (Some(proxy), Some(before)) => Some(proxy.settled_gateway_requests()? - before),
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

fn build_observer(workspace: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args(["build", "--release", "--package", "observer"])
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("building observer (release) failed ({status})");
    }
    Ok(workspace.join("target/release/observer"))
}
