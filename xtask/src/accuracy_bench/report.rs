//! The section "Timing accuracy" of `docs/BENCHMARKS.md`.

use std::fmt::Write as _;

use crate::common::{
    report::{finish, machine, paragraph},
    stats::Spread,
};

use super::{KINDS, Kind, Options, Round, SIM_FLAGS, WARM_UP, over_rounds};

pub const SECTION: &str = "## Timing accuracy";

/// `median (min–max)` over the rounds, in milliseconds.
fn ms(spread: Option<Spread>) -> String {
    spread.map_or_else(|| "–".to_owned(), |s| s.show(3, 1e3))
}

pub fn markdown(
    opts: &Options,
    rounds: &[Round],
    realtime: bool,
    lost: u64,
    parse_errors: u64,
) -> String {
    let mut s = format!("{SECTION}\n\n");
    s += &paragraph(&format!(
        "`xtask/src/accuracy_bench/`: nginx (the gateway: 2 workers, upstream keep-alive, \
         `proxy_buffering off`) in front of `observer sim {}` (release build), `observer run \
         --no-probe --gpu off` (release build) watching both ports. A Rust client sends one \
         request at a time on a keep-alive HTTP/1.1 connection, each with its own simulated \
         timing (`X-Sim-Fault: first-token-ms=20..50, token-ms=2..5, tokens=10..30`), cycling \
         through streamed `/api/chat` (2 in 5), streamed `/api/generate`, streamed \
         `/v1/chat/completions` (server-sent events) and non-streamed `/api/chat`. At its \
         socket it reads its clock just before writing the request, just after, and when the \
         read that completed the first line carrying model output returned (a non-empty \
         `message.content`, `response` or `delta.content`, parsed from the chunked body; the \
         first body byte for a non-streamed response), and the read that brought the last byte \
         (the chunked terminator). The client's duration is request write to last byte; its \
         time to first chunk is request written to first output. After each request it scrapes \
         `/metrics` until `observer_http_requests_total{{role=\"gateway\"}}` has grown by one \
         (requiring exactly one more observation in each histogram too), and takes the growth \
         of the gateway's `observer_http_request_duration_seconds_sum` and \
         `gen_ai_server_time_to_first_token_seconds_sum` as the observer's figures. {} requests \
         per round after {WARM_UP} warm-up requests, {} rounds; per round the median and p99 \
         (nearest rank) of |observer − client|, then their median (min–max) over the rounds. \
         The client and nginx's workers run at real-time priority (SCHED_FIFO 1){}, so that \
         other work on the machine does not delay one side of a comparison.",
        SIM_FLAGS.join(" "),
        opts.requests,
        opts.rounds,
        if realtime {
            ""
        } else {
            " where allowed (it was not, this run)"
        },
    ));
    let _ = write!(
        s,
        "```sh\ncargo xtask bench accuracy -- --requests {} --rounds {}\n```\n\n",
        opts.requests, opts.rounds
    );
    s += &paragraph(&machine());

    s += "| requests | per round | duration: median \\|Δ\\| | duration: p99 \\|Δ\\| | first chunk: median \\|Δ\\| | first chunk: p99 \\|Δ\\| |\n\
          |---|---|---|---|---|---|\n";
    let rows = std::iter::once(None).chain(KINDS.map(Some));
    for kind in rows {
        let per_round = rounds.first().map_or(0, |r| r.of(kind).count());
        let name = kind.map_or_else(|| "**all**".to_owned(), |k: Kind| k.to_string());
        let _ = writeln!(
            s,
            "| {name} | {per_round} | {} ms | {} ms | {} ms | {} ms |",
            ms(over_rounds(rounds, kind, |(d, _)| d.median)),
            ms(over_rounds(rounds, kind, |(d, _)| d.p99)),
            ms(over_rounds(rounds, kind, |(_, t)| t.median)),
            ms(over_rounds(rounds, kind, |(_, t)| t.p99)),
        );
    }
    s.push('\n');

    let signed = |f: fn(&super::Sample) -> f64| {
        Spread::of(
            rounds
                .iter()
                .filter_map(|r| Spread::of(r.samples.iter().map(f)).map(|s| s.median)),
        )
    };
    let worst = |f: fn(&super::Sample) -> f64| {
        rounds
            .iter()
            .flat_map(|r| r.samples.iter().map(f))
            .fold(0.0_f64, |w, d| w.max(d.abs()))
    };
    let others: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.2}", r.others_cores))
        .collect();
    s += &paragraph(&format!(
        "Δ = observer − client. Its median, signed: duration {} ms, time to first chunk {} ms \
         (the observer's clock starts when nginx reads the request and stops when nginx writes \
         the last byte, so it reads a little less than the client). Worst |Δ| of all {} \
         requests: duration {:.3} ms, time to first chunk {:.3} ms. Events lost: {lost}; HTTP \
         parse errors: {parse_errors}. CPU that other processes used during each round, in \
         cores: {}.",
        ms(signed(super::Sample::duration_diff)),
        ms(signed(super::Sample::first_chunk_diff)),
        rounds.iter().map(|r| r.samples.len()).sum::<usize>(),
        worst(super::Sample::duration_diff) * 1e3,
        worst(super::Sample::first_chunk_diff) * 1e3,
        others.join(", "),
    ));
    finish(s)
}
