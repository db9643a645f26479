//! The figures as markdown: the section "Proxy against nginx" of `docs/BENCHMARKS.md`.

use std::fmt::Write as _;

use anyhow::Context as _;

use super::{CONTENDERS, Memory, Options, Round, WARM_UP};
use crate::common::{
    PATH,
    report::{finish, grouped, machine, mib, paragraph},
    rounds::DISTURBED_CORES,
    stats::Spread,
};

pub const SECTION: &str = "## Proxy against nginx";
/// The section for docs/BENCHMARKS.md, heading included.
pub fn markdown(
    opts: &Options,
    rounds: &[Round],
    disturbed: usize,
    memory: &[Memory; 2],
) -> anyhow::Result<String> {
    let of = |c: usize| rounds.iter().filter(move |r| r.contender == c);
    let spread = |values: Vec<f64>| Spread::of(values).context("no rounds");
    let stats = |c: usize| -> anyhow::Result<_> {
        Ok((
            spread(of(c).map(|r| r.wrk.per_second).collect())?,
            spread(of(c).map(|r| r.wrk.p50_us / 1e3).collect())?,
            spread(of(c).map(|r| r.wrk.p99_us / 1e3).collect())?,
            spread(of(c).map(|r| r.cpu_us_per_request).collect())?,
            of(c).map(|r| r.wrk.errors).sum::<u64>(),
        ))
    };
    let stats = [stats(0)?, stats(1)?];
    let names = ["nginx, 2 workers, upstream keep-alive", "`observer proxy`"];
    let idle = grouped(memory[0].count as u64);

    let mut s = format!("{SECTION}\n\n");
    s += &paragraph(&format!(
        "`xtask/src/proxy_bench/`: `observer proxy` (release build; `--no-probe --gpu off --log \
         warn`) against nginx as a plain reverse proxy (`worker_processes 2`, one per core of \
         this 2-core machine; `upstream` with `keepalive 64`, `proxy_http_version 1.1`, \
         `proxy_set_header Connection \"\"`, default buffering, `access_log off`), both in front \
         of the same fast upstream: a third nginx, one worker, answering `{PATH}` with `200 \
         {{\"status\":\"ok\"}}`. Keep-alive request limits are lifted on all three, so no side \
         closes a connection on its own. `wrk -t2 -c{} -d{}s --latency \
         http://127.0.0.1:PORT{PATH}`: {} measured rounds per contender, alternating (nginx, \
         observer, nginx, ...), each after a {WARM_UP} s warm-up and once the machine is quiet; \
         wrk, the upstream and the contender share the 2 cores. Median (min–max) over the \
         rounds.",
        opts.wrk.connections, opts.wrk.seconds, opts.wrk.rounds
    ));
    s += "```sh\ncargo xtask bench proxy   # -- --rounds N --seconds S --connections C --idle N --no-doc\n```\n\n";
    s += &paragraph(&machine());
    s += "| contender | requests/s | p50 latency | p99 latency | CPU per request | errors |\n\
          |---|---|---|---|---|---|\n";
    for (name, (rps, p50, p99, cpu, errors)) in names.iter().zip(&stats) {
        writeln!(
            s,
            "| {name} | {} | {} ms | {} ms | {} µs | {errors} |",
            rps.show_grouped(),
            p50.show(2, 1.0),
            p99.show(2, 1.0),
            cpu.show(1, 1.0),
        )?;
    }
    let [a, b] = &stats;
    writeln!(
        s,
        "| **observer / nginx** (medians) | **{:.2}** (target ≥ 1) | {:.2} | **{:.2}** (target ≤ 1) | {:.2} | |\n",
        b.0.median / a.0.median,
        b.1.median / a.1.median,
        b.2.median / a.2.median,
        b.3.median / a.3.median
    )?;
    s += &paragraph(
        "CPU per request: user and system time of the contender's processes over a round (their \
         share of the loopback's kernel work included) divided by the requests wrk completed. \
         The 2 cores are saturated by wrk, the upstream and the contender together, so the \
         contender's CPU per request largely decides its throughput.",
    );
    let order: Vec<String> = rounds
        .iter()
        .map(|r| {
            format!(
                "{} {} ({:.2})",
                CONTENDERS[r.contender],
                grouped(r.wrk.per_second as u64),
                r.others_cores
            )
        })
        .collect();
    s += &paragraph(&format!(
        "Rounds in order, requests/s (and the CPU other processes on the machine used meanwhile, \
         in cores): {}. Rounds run again because others used more than {DISTURBED_CORES} cores \
         meanwhile: {disturbed}.",
        order.join(", ")
    ));

    s += &paragraph(&format!(
        "Memory: {idle} idle keep-alive connections held open to each contender after the rounds, \
         each after one request and its response (so the upstream connection behind it was \
         made), read 1 s later. nginx's figures sum the master and both workers (RSS counts their \
         shared pages once in each; PSS shares them out). nginx keeps at most 64 idle upstream \
         connections per worker; the observer proxy holds one upstream connection per client \
         connection. The peak is `VmHWM` over the whole run, the load rounds included."
    ));
    writeln!(
        s,
        "| contender | RSS before | RSS with {idle} connections | PSS with them | peak RSS | sockets open |\n\
         |---|---|---|---|---|---|"
    )?;
    for (name, m) in names.iter().zip(memory) {
        writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {} |",
            mib(m.idle_rss_kib),
            mib(m.rss_kib),
            mib(m.pss_kib),
            mib(m.peak_kib),
            grouped(m.sockets as u64)
        )?;
    }
    s.push('\n');
    s += &paragraph(&format!(
        "Target for the observer proxy: RSS under 32 MiB with 1,000 connections; it has {} \
         ({:.2} of nginx's RSS, {:.2} of its PSS).",
        mib(memory[1].rss_kib),
        memory[1].rss_kib as f64 / memory[0].rss_kib as f64,
        memory[1].pss_kib as f64 / memory[0].pss_kib as f64,
    ));

    let observer: Vec<&Round> = of(1).collect();
    let completed: u64 = observer.iter().map(|r| r.wrk.requests).sum();
    let counted: u64 = observer.iter().filter_map(|r| r.counted).sum();
    let per_round: Vec<String> = observer
        .iter()
        .map(|r| {
            format!(
                "{} / {}",
                grouped(r.wrk.requests),
                grouped(r.counted.unwrap_or_default())
            )
        })
        .collect();
    s += &paragraph(&format!(
        "Requests counted: over the observer's measured rounds wrk completed {} requests and \
         `observer_http_requests_total{{role=\"gateway\"}}` rose by {} (difference {:+}; per \
         round, wrk / proxy: {}). wrk stops with up to {} requests in flight, which it does not \
         count.",
        grouped(completed),
        grouped(counted),
        counted as i64 - completed as i64,
        per_round.join(", "),
        opts.wrk.connections
    ));
    Ok(finish(s))
}
