//! The section "Soak" of `docs/BENCHMARKS.md`.

use std::fmt::Write as _;

use crate::common::report::{finish, grouped, machine, mib, paragraph};

use super::{
    SIM_FLAGS, Soak,
    faults::{BURST, HALF_OPEN},
    sampling::ROLES,
};

pub const SECTION: &str = "## Soak";

pub fn markdown(soak: &Soak, failures: &[String]) -> String {
    let t = &soak.tally;
    let mut s = format!("{SECTION}\n\n");
    let rotation: Vec<String> = soak.faults.iter().map(ToString::to_string).collect();
    s += &paragraph(&format!(
        "`xtask/src/soak/`: nginx (the gateway: 2 workers, upstream keep-alive, `proxy_buffering \
         off`) in front of `observer sim {}`, `observer run --no-probe --gpu off` watching both \
         ports (release builds), for {} s. {} users, each on a keep-alive connection, send \
         `/api/chat` (half), `/api/generate` and `/v1/chat/completions` (a quarter each), three \
         in four streamed, each with a short simulated reply (first token after 10–50 ms, 5–30 \
         tokens 2–8 ms apart) or, for {:.0} %, a 500 (`X-Sim-Fault: status=500`), with 20–200 ms \
         between requests. Every {} s a fault (the first half a period in), in rotation: {}. The upstream is killed while a \
         10 s stream of the soak's own is under way and started again on the same port 1 s \
         later; the garbage is random bytes, a TLS ClientHello, a Redis `PING`, an SSH banner \
         and an HTTP/2 preface, each on its own connection to each port; the burst is {BURST} \
         connections to the gateway held for 0.5 s; the half-open connections ({HALF_OPEN}, a \
         fifth to the upstream) send part of a request head, hold it 3 s and then half close, \
         half reset. Every exchange the clients make through the gateway is recorded: whole, \
         or cut after the head (the observer counts both under their status), or with no \
         response. The daemon's RSS (`VmRSS`) and gauges are read every {} s. After the \
         workload stops, once the daemon has settled, for every status the clients' responses \
         must equal `observer_http_requests_total{{role=\"gateway\",code=...}}`, in-flight be 0 \
         and `observer_tcp_connections_active` equal the connections open on each port (server \
         side, `ESTABLISHED` or `CLOSE_WAIT` in `/proc/net/tcp`), and the RSS slope over the \
         second half (least squares) stay under {} KiB/min.",
        SIM_FLAGS.join(" "),
        soak.duration.as_secs(),
        soak.users,
        soak.error_rate * 100.0,
        soak.fault_every.as_secs_f64(),
        rotation.join("; "),
        soak.sample_every.as_secs_f64(),
        soak.max_growth,
    ));
    let _ = write!(
        s,
        "```sh\n{}\n```\n\n",
        super::command_line(soak.duration, &soak.args)
    );
    s += &paragraph(&machine());

    s += &paragraph(&if failures.is_empty() {
        "**Result: passed.**".to_owned()
    } else {
        format!("**Result: failed.** {}", failures.join("; "))
    });

    s += "| at | fault | what happened |\n|---|---|---|\n";
    for f in &soak.struck {
        let _ = writeln!(
            s,
            "| {:.0} s | {} | {} |",
            f.at_s,
            f.fault,
            f.what.replace('|', "/")
        );
    }
    s.push('\n');

    s += "| code | clients: whole + cut | observer (gateway) | difference |\n|---|---|---|---|\n";
    for (code, client, observed) in soak.by_code() {
        let cut = code
            .parse()
            .ok()
            .and_then(|c| t.cut.get(&c))
            .copied()
            .unwrap_or(0);
        let _ = writeln!(
            s,
            "| {code} | {} ({} + {cut}) | {} | {:+} |",
            grouped(client),
            grouped(client - cut),
            grouped(observed),
            observed as i64 - client as i64
        );
    }
    s.push('\n');
    let scrape = &soak.settled.scrape;
    let observed_incomplete = scrape.sum(
        "observer_llm_requests_total",
        &[("role", "gateway"), ("done_reason", "incomplete")],
    ) as u64;
    let (none, none_expected) = (soak.observed("gateway", "none"), soak.none_expected());
    let incomplete_expected = soak.incomplete_expected();
    let differs = |observed: u64, expected: u64| {
        if observed == expected {
            "equal".to_owned()
        } else {
            format!("**{:+}**", observed as i64 - expected as i64)
        }
    };
    s += &paragraph(&format!(
        "Exchanges: {} in all. Without a response (`code=\"none\"`): observer {none}; expected \
         {none_expected} ({}): the clients had {} requests with no response on a fresh \
         connection and {} on a reused one (the server closing it as the request went out), {} \
         responses cut within the head, {} timed out, and the half-open fault left {} requests \
         whose head was whole at the gateway. (Expected, not required: a request written into \
         a connection the server has just closed is never read, and so never counted.) Not \
         exchanges the gateway saw: {} requests could not be written, {} connections were \
         refused. `done_reason=\"incomplete\"` (a request naming a model, ended without a \
         whole response): observer {}; expected {incomplete_expected} ({}): {} streams cut \
         after the head and the requests without a response above. Malformed responses: {}{}.",
        grouped(t.exchanges()),
        differs(none, none_expected),
        t.no_response_fresh,
        t.no_response_reused,
        t.cut_in_head,
        t.timed_out,
        soak.probes.abandoned_with_head,
        t.unsent,
        t.refused,
        observed_incomplete,
        differs(observed_incomplete, incomplete_expected),
        t.cut.values().sum::<u64>(),
        t.malformed,
        if t.malformed_examples.is_empty() {
            String::new()
        } else {
            format!(" ({})", t.malformed_examples.join("; "))
        },
    ));
    let probes: Vec<String> = soak
        .probes
        .answers
        .iter()
        .map(|((role, answer), n)| format!("{role} {answer}: {n}"))
        .collect();
    let parse_errors =
        ROLES.map(|role| scrape.sum("observer_http_parse_errors_total", &[("role", role)]) as u64);
    s += &paragraph(&format!(
        "Answers to the garbage (not HTTP exchanges, not in the counts above): {}. \
         `observer_http_parse_errors_total`: gateway {}, upstream {}. Upstream exchanges \
         counted (for reference; nginx's own requests): {}.",
        probes.join(", "),
        parse_errors[0],
        parse_errors[1],
        grouped(scrape.sum("observer_http_requests_total", &[("role", "upstream")]) as u64),
    ));

    let st = &soak.settled;
    s += &paragraph(&format!(
        "At the end ({} after {:.1} s): in flight gateway {}, upstream {}; \
         `observer_tcp_connections_active` gateway {}, upstream {}, against {} and {} open; \
         events lost {}.",
        if st.settled { "settled" } else { "not settled" },
        st.after_s,
        st.sample.in_flight[0],
        st.sample.in_flight[1],
        st.sample.connections[0],
        st.sample.connections[1],
        st.open[0],
        st.open[1],
        st.sample.lost,
    ));

    if let (Some(first), Some(last)) = (soak.samples.first(), soak.samples.last()) {
        let max = soak.samples.iter().map(|x| x.rss_kib).max().unwrap_or(0);
        s += &paragraph(&format!(
            "Memory (RSS): first {} (at {:.0} s), last {}, max {}; slope over the second half \
             {} KiB/min (bound {} KiB/min). Per minute (last sample of each), and the gauges \
             then:",
            mib(first.rss_kib),
            first.at_s,
            mib(last.rss_kib),
            mib(max),
            soak.rss_slope()
                .map_or("–".to_owned(), |v| format!("{v:.1}")),
            soak.max_growth,
        ));
        s += "| minute | RSS | threads | connections gateway / upstream | in flight gateway / upstream | requests (gateway) |\n\
              |---|---|---|---|---|---|\n";
        let mut minute = None;
        for (i, x) in soak.samples.iter().enumerate() {
            let m = (x.at_s / 60.0) as u64;
            let next_minute = soak.samples.get(i + 1).map(|n| (n.at_s / 60.0) as u64);
            if next_minute != Some(m) && minute != Some(m) {
                minute = Some(m);
                let _ = writeln!(
                    s,
                    "| {:.1} | {} | {} | {} / {} | {} / {} | {} |",
                    x.at_s / 60.0,
                    mib(x.rss_kib),
                    x.threads,
                    x.connections[0],
                    x.connections[1],
                    x.in_flight[0],
                    x.in_flight[1],
                    grouped(x.requests as u64)
                );
            }
        }
    }
    finish(s)
}
