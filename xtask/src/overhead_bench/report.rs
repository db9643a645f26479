//! The figures as markdown: the section "Observer overhead" of `docs/BENCHMARKS.md`.

use std::fmt::Write as _;

use anyhow::Context as _;

use super::{CONTENDERS, Load, Observed, Options, Round, WARM_UP};
use crate::{
    common::{
        PATH,
        report::{finish, grouped, machine, paragraph},
        rounds::DISTURBED_CORES,
        stats::Spread,
    },
    observer_run::WATCH_ONLY,
    rate::RateResult,
};

pub const SECTION: &str = "## Observer overhead";
/// Targets: observer / none.
const THROUGHPUT_TARGET: f64 = 0.97;
const P99_TARGET: f64 = 1.05;
/// Target: p50 added per request at a fixed rate, in microseconds.
const ADDED_P50_TARGET_US: f64 = 20.0;

/// The rounds of both comparisons, in the order they ran.
pub struct Measured<'a> {
    pub wrk: &'a [Round],
    pub rate: &'a [Round],
    /// Rounds run again because others used the machine.
    pub again: usize,
}

fn of(rounds: &[Round], contender: usize) -> impl Iterator<Item = &Round> {
    rounds.iter().filter(move |r| r.contender == contender)
}

fn wrk_of(
    rounds: &[Round],
    contender: usize,
) -> impl Iterator<Item = &crate::common::wrk::WrkResult> {
    of(rounds, contender).filter_map(|r| match &r.load {
        Load::Wrk(w) => Some(w),
        Load::Rate(_) => None,
    })
}

fn rate_of(rounds: &[Round], contender: usize) -> impl Iterator<Item = &RateResult> {
    of(rounds, contender).filter_map(|r| match &r.load {
        Load::Rate(l) => Some(l),
        Load::Wrk(_) => None,
    })
}

/// The daemon's CPU per completed request over the rounds, in microseconds (`None` for the
/// contender without it).
fn daemon_us_per_request(rounds: &[Round], contender: usize) -> Option<Spread> {
    Spread::of(
        of(rounds, contender).filter_map(|r| {
            Some(r.observed.as_ref()?.cpu_s * 1e6 / r.load.completed().max(1) as f64)
        }),
    )
}

fn spread(values: impl IntoIterator<Item = f64>) -> anyhow::Result<Spread> {
    Spread::of(values).context("no rounds")
}

/// `**0.98** (target ≥ 0.97, met)`.
fn against(value: f64, target: f64, at_least: bool) -> String {
    let met = if at_least {
        value >= target
    } else {
        value <= target
    };
    format!(
        "**{value:.2}** (target {} {target}, {})",
        if at_least { "≥" } else { "≤" },
        if met { "met" } else { "**missed**" }
    )
}

/// `observer − none` per pair of rounds (round k of each), in order.
fn pair_differences(rounds: &[Round], value: impl Fn(&Round) -> f64) -> Vec<f64> {
    of(rounds, 0)
        .zip(of(rounds, 1))
        .map(|(none, observer)| value(observer) - value(none))
        .collect()
}

pub fn markdown(opts: &Options, m: &Measured) -> anyhow::Result<String> {
    let mut s = format!("{SECTION}\n\n");
    s += &paragraph(&format!(
        "`xtask/src/overhead_bench/`: nginx as the gateway (`worker_processes 2`, `upstream` with \
         `keepalive 64`, as in the proxy benchmark) in front of the fast upstream nginx (one \
         worker answering `{PATH}` with `200 {{\"status\":\"ok\"}}`), on free ports; the load \
         generator, both nginx and the observer share the 2 cores. Two contenders in alternating \
         rounds: no observer, and `observer run --watch GW=gateway --watch UP=upstream {}` \
         (release build). The daemon is started before each of its rounds and stopped after (its \
         kernel programs hook every process's socket calls while attached, so one kept across \
         rounds would tax the other contender too); every round runs once the machine is quiet, \
         after a {WARM_UP} s warm-up under the same load. {} measured rounds per contender in \
         each comparison; median (min–max) over the rounds.",
        WATCH_ONLY.join(" "),
        opts.wrk.rounds
    ));
    s += "```sh\ncargo xtask bench overhead   # -- --rounds N --retries N --seconds S --connections C --rate R --rate-seconds S --rate-connections C --no-doc --doc PATH\n```\n\n";
    s += &paragraph(&machine());
    wrk_table(&mut s, opts, m.wrk)?;
    rate_table(&mut s, opts, m.rate)?;
    counts(&mut s, opts, m)?;
    Ok(finish(s))
}

fn wrk_table(s: &mut String, opts: &Options, rounds: &[Round]) -> anyhow::Result<()> {
    *s += &paragraph(&format!(
        "Closed loop, the machine saturated: `wrk -t2 -c{} -d{}s --latency \
         http://127.0.0.1:GW{PATH}`. nginx CPU: user and system time of both nginx (masters and \
         workers) per completed request, which includes the kernel programs' work in their \
         system calls; the daemon's is its own process's.",
        opts.wrk.connections, opts.wrk.seconds
    ));
    *s += "| contender | requests/s | p50 latency | p99 latency | errors | nginx CPU per request | daemon CPU per request |\n\
           |---|---|---|---|---|---|---|\n";
    let mut medians = Vec::new();
    for c in 0..CONTENDERS.len() {
        let rps = spread(wrk_of(rounds, c).map(|w| w.per_second))?;
        let p50 = spread(wrk_of(rounds, c).map(|w| w.p50_us / 1e3))?;
        let p99 = spread(wrk_of(rounds, c).map(|w| w.p99_us / 1e3))?;
        let nginx = spread(of(rounds, c).map(|r| r.nginx_us_per_request))?;
        let daemon = daemon_us_per_request(rounds, c)
            .map_or("–".to_owned(), |d| format!("{} µs", d.show(2, 1.0)));
        writeln!(
            s,
            "| {} | {} | {} ms | {} ms | {} | {} µs | {daemon} |",
            name(c),
            rps.show_grouped(),
            p50.show(2, 1.0),
            p99.show(2, 1.0),
            wrk_of(rounds, c).map(|w| w.errors).sum::<u64>(),
            nginx.show(1, 1.0),
        )?;
        medians.push((rps.median, p50.median, p99.median, nginx.median));
    }
    let (a, b) = (medians[0], medians[1]);
    writeln!(
        s,
        "| **observer / none** (medians) | {} | {:.2} | {} | | {:.2} | |\n",
        against(b.0 / a.0, THROUGHPUT_TARGET, true),
        b.1 / a.1,
        against(b.2 / a.2, P99_TARGET, false),
        b.3 / a.3
    )?;
    Ok(())
}

fn name(contender: usize) -> &'static str {
    ["no observer", "`observer run` attached"][contender]
}

fn rate_table(s: &mut String, opts: &Options, rounds: &[Round]) -> anyhow::Result<()> {
    *s += &paragraph(&format!(
        "Fixed rate, open loop (`xtask/src/rate.rs`): {} requests/s of `GET {PATH}` over {} \
         keep-alive connections (one thread each, no pipelining) for {} s per round. Latency is \
         taken from each request's scheduled send time (a stall delays the requests queued \
         behind it and shows) and from its actual send. Daemon CPU: the daemon's user and system \
         time over the round per 1,000 completed responses.",
        grouped(opts.rate as u64),
        opts.rate_connections,
        opts.rate_seconds()
    ));
    *s += "| contender | rate achieved | p50 from the schedule | p50 from the send | p99 from the schedule | nginx CPU per request | daemon CPU per 1,000 requests |\n\
           |---|---|---|---|---|---|---|\n";
    let mut p50s = Vec::new();
    for c in 0..CONTENDERS.len() {
        let achieved = spread(rate_of(rounds, c).map(RateResult::achieved_rate))?;
        let p50 = spread(rate_of(rounds, c).map(|r| r.latency_from_schedule_us(50.0)))?;
        let p50_send = spread(rate_of(rounds, c).map(|r| r.latency_from_send_us(50.0)))?;
        let p99 = spread(rate_of(rounds, c).map(|r| r.latency_from_schedule_us(99.0)))?;
        let nginx = spread(of(rounds, c).map(|r| r.nginx_us_per_request))?;
        // Microseconds per request are milliseconds per 1,000.
        let daemon = daemon_us_per_request(rounds, c)
            .map_or("–".to_owned(), |d| format!("**{} ms**", d.show(2, 1.0)));
        writeln!(
            s,
            "| {} | {} /s | {} µs | {} µs | {} µs | {} µs | {daemon} |",
            name(c),
            achieved.show_grouped(),
            p50.show(1, 1.0),
            p50_send.show(1, 1.0),
            p99.show(1, 1.0),
            nginx.show(1, 1.0),
        )?;
        p50s.push((p50.median, p50_send.median));
    }
    let added = p50s[1].0 - p50s[0].0;
    let added_send = p50s[1].1 - p50s[0].1;
    let rate = |r: &Round| match &r.load {
        Load::Rate(l) => l.latency_from_schedule_us(50.0),
        Load::Wrk(_) => 0.0,
    };
    let pairs = pair_differences(rounds, rate);
    let pairs_spread = spread(pairs.iter().copied())?;
    let met = if added <= ADDED_P50_TARGET_US {
        "met"
    } else {
        "**missed**"
    };
    writeln!(
        s,
        "| **added p50 per request** (observer − none, medians) | | **{added:+.1} µs** (target ≤ \
         {ADDED_P50_TARGET_US} µs, {met}) | {added_send:+.1} µs | | | |\n"
    )?;
    let list: Vec<String> = pairs.iter().map(|d| format!("{d:+.1}")).collect();
    *s += &paragraph(&format!(
        "Added p50 per pair of rounds (round k of each contender), µs: {} (median {}).",
        list.join(", "),
        pairs_spread.show(1, 1.0)
    ));
    Ok(())
}

/// The observer's rounds: completed requests and what the daemon saw.
fn observed(rounds: &[Round]) -> Vec<(u64, &Observed)> {
    of(rounds, 1)
        .filter_map(|r| Some((r.load.completed(), r.observed.as_ref()?)))
        .collect()
}

fn counts(s: &mut String, opts: &Options, m: &Measured) -> anyhow::Result<()> {
    let rate = observed(m.rate);
    let exact = rate
        .iter()
        .filter(|(n, o)| o.gateway == *n && o.upstream == *n)
        .count();
    let per_round: Vec<String> = rate
        .iter()
        .map(|(n, o)| {
            format!(
                "{} / {} / {}",
                grouped(*n),
                grouped(o.gateway),
                grouped(o.upstream)
            )
        })
        .collect();
    let lost: u64 = rate
        .iter()
        .chain(&observed(m.wrk))
        .map(|(_, o)| o.lost)
        .sum();
    *s += &paragraph(&format!(
        "Requests counted, fixed rate: the daemon's `observer_http_requests_total` rose by exactly \
         the generator's completed responses, for the gateway and for the upstream, in {} of {} \
         rounds{} (per round, completed / gateway / upstream: {}). Events lost \
         (`observer_ebpf_events_lost_total`, every kind, over all its rounds): {lost}.",
        exact,
        rate.len(),
        if exact == rate.len() {
            ""
        } else {
            " (**not all**)"
        },
        per_round.join(", ")
    ));
    let wrk = observed(m.wrk);
    let per_round: Vec<String> = wrk
        .iter()
        .map(|(n, o)| {
            format!(
                "{:+} / {:+}",
                o.gateway as i64 - *n as i64,
                o.upstream as i64 - *n as i64
            )
        })
        .collect();
    *s += &paragraph(&format!(
        "Under wrk, which stops with up to {} requests in flight and does not count them, the \
         counts' differences from wrk's completed requests, gateway / upstream, per round: {}.",
        opts.wrk.connections,
        per_round.join(", ")
    ));
    let order = |rounds: &[Round], value: &dyn Fn(&Round) -> String| -> Vec<String> {
        rounds
            .iter()
            .map(|r| {
                format!(
                    "{} {} ({:.2})",
                    CONTENDERS[r.contender],
                    value(r),
                    r.others_cores
                )
            })
            .collect()
    };
    let wrk_order = order(m.wrk, &|r| match &r.load {
        Load::Wrk(w) => grouped(w.per_second as u64),
        Load::Rate(_) => String::new(),
    });
    let rate_order = order(m.rate, &|r| match &r.load {
        Load::Rate(l) => format!("{:.1} µs", l.latency_from_schedule_us(50.0)),
        Load::Wrk(_) => String::new(),
    });
    *s += &paragraph(&format!(
        "Rounds in order (and the CPU other processes on the machine used meanwhile, in cores): \
         wrk, requests/s: {}; fixed rate, p50 from the schedule: {}. Rounds run again because \
         others used more than {DISTURBED_CORES} cores meanwhile: {}.",
        wrk_order.join(", "),
        rate_order.join(", "),
        m.again
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::{parse_options, wrk::WrkResult};

    fn wrk_round(contender: usize, per_second: f64, p99_us: f64) -> Round {
        Round {
            contender,
            load: Load::Wrk(WrkResult {
                per_second,
                p50_us: 1000.0,
                p99_us,
                requests: per_second as u64 * 10,
                errors: 0,
            }),
            nginx_us_per_request: 20.0,
            others_cores: 0.0,
            observed: (contender == 1).then_some(Observed {
                cpu_s: 0.1,
                gateway: per_second as u64 * 10 + 64,
                upstream: per_second as u64 * 10 + 60,
                lost: 0,
            }),
        }
    }

    /// 20,000 responses at 2,000/s; the p50 from the schedule is `p50_us`.
    fn rate_round(contender: usize, p50_us: u64, counted: u64) -> Round {
        let load = RateResult {
            scheduled: 20_000,
            sent: 20_000,
            by_status: [(200, 20_000)].into(),
            send_window: std::time::Duration::from_secs(10),
            from_schedule_ns: vec![p50_us * 1000; 20_000],
            from_send_ns: vec![(p50_us - 10) * 1000; 20_000],
            ..RateResult::default()
        };
        Round {
            contender,
            load: Load::Rate(load),
            nginx_us_per_request: 25.0,
            others_cores: 0.01,
            observed: (contender == 1).then_some(Observed {
                cpu_s: 0.2,
                gateway: counted,
                upstream: 20_000,
                lost: 0,
            }),
        }
    }

    #[test]
    fn ratios_added_latency_and_counts() {
        let opts: Options =
            parse_options("bench overhead", &["--rounds".into(), "2".into()]).unwrap();
        assert_eq!(
            (opts.wrk.rounds, opts.rate_seconds(), opts.rate),
            (2, 10, 2000.0)
        );
        let wrk = [
            wrk_round(0, 40_000.0, 4000.0),
            wrk_round(1, 39_000.0, 4400.0),
            wrk_round(0, 42_000.0, 4000.0),
            wrk_round(1, 41_000.0, 4400.0),
        ];
        let rate = [
            rate_round(0, 100, 0),
            rate_round(1, 112, 20_000),
            rate_round(0, 104, 0),
            rate_round(1, 120, 19_999),
        ];
        let s = markdown(
            &opts,
            &Measured {
                wrk: &wrk,
                rate: &rate,
                again: 1,
            },
        )
        .unwrap();
        let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
        // 40,000 / 41,000 medians: 0.976; p99 4.4 / 4.0 = 1.10.
        assert!(s.contains("| **0.98** (target ≥ 0.97, met) |"), "{s}");
        assert!(
            s.contains("| **1.10** (target ≤ 1.05, **missed**) |"),
            "{s}"
        );
        assert!(s.contains("| 40,000 (39,000–41,000) |"), "{s}");
        // Medians 102 and 116 µs: +14 µs; pairs +12 and +16.
        assert!(s.contains("**+14.0 µs** (target ≤ 20 µs, met)"), "{s}");
        assert!(
            flat.contains("µs: +12.0, +16.0 (median 14.0 (12.0–16.0))"),
            "{s}"
        );
        // 0.2 s of daemon CPU over 20,000 requests: 10 ms per 1,000.
        assert!(s.contains("| **10.00 (10.00–10.00) ms** |"), "{s}");
        assert!(flat.contains("in 1 of 2 rounds (**not all**)"), "{s}");
        assert!(flat.contains("20,000 / 19,999 / 20,000"), "{s}");
        assert!(flat.contains("per round: +64 / +60, +64 / +60."), "{s}");
        assert!(flat.contains("meanwhile: 1."), "{s}");
    }
}
