//! The figures as markdown: the section "Proxy against nginx" of `docs/BENCHMARKS.md`,
//! which it replaces in place (or appends) without touching the rest of the file.

use std::{fmt::Write as _, fs, path::Path, process::Command};

use anyhow::Context as _;

use super::{CONTENDERS, DISTURBED_CORES, Memory, Options, PATH, Round, WARM_UP, servers::NGINX};

pub const SECTION: &str = "## Proxy against nginx";
/// Prose lines are wrapped like the rest of the file.
const WIDTH: usize = 96;

/// Median, min and max.
fn spread(values: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Thousands separated by commas.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A paragraph broken into lines of at most [`WIDTH`] characters, ending with a blank line.
fn paragraph(text: &str) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > WIDTH {
            out += &line;
            out.push('\n');
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line += word;
    }
    out + &line + "\n\n"
}

/// What a program prints (stdout and stderr), trimmed; empty if it cannot run.
fn output_of(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text).trim().to_owned()
        })
        .unwrap_or_default()
}

/// The machine and tools, in one sentence.
fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            Some(
                l.strip_prefix("model name")?
                    .split_once(':')?
                    .1
                    .trim()
                    .to_owned(),
            )
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let wrk = output_of("wrk", &["-v"]);
    let wrk = wrk.lines().next().unwrap_or_default();
    let wrk = wrk.split(" [").next().unwrap_or_default();
    let rustc = output_of("rustc", &["--version"]);
    let rustc = rustc.split(" (").next().unwrap_or_default();
    let date = output_of("date", &["-u", "+%F"]);
    format!(
        "Machine: `nproc` {cores}, {cpu}, kernel {}; {wrk}, {}, {rustc}. Date: {date}.",
        kernel.trim(),
        output_of(NGINX, &["-v"]).trim_start_matches("nginx version: "),
    )
}

/// The section for docs/BENCHMARKS.md, heading included.
pub fn markdown(
    opts: &Options,
    rounds: &[Round],
    disturbed: usize,
    memory: &[Memory; 2],
) -> anyhow::Result<String> {
    let of = |c: usize| rounds.iter().filter(move |r| r.contender == c);
    let stats = |c: usize| {
        (
            spread(of(c).map(|r| r.wrk.per_second)),
            spread(of(c).map(|r| r.wrk.p50_us / 1e3)),
            spread(of(c).map(|r| r.wrk.p99_us / 1e3)),
            spread(of(c).map(|r| r.cpu_us_per_request)),
            of(c).map(|r| r.wrk.errors).sum::<u64>(),
        )
    };
    let stats = [stats(0), stats(1)];
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
        opts.connections, opts.seconds, opts.rounds
    ));
    s += "```sh\ncargo xtask bench proxy   # -- --rounds N --seconds S --connections C --idle N --no-doc\n```\n\n";
    s += &paragraph(&machine());
    s += "| contender | requests/s | p50 latency | p99 latency | CPU per request | errors |\n\
          |---|---|---|---|---|---|\n";
    for (name, (rps, p50, p99, cpu, errors)) in names.iter().zip(&stats) {
        writeln!(
            s,
            "| {name} | {} ({}–{}) | {:.2} ms ({:.2}–{:.2}) | {:.2} ms ({:.2}–{:.2}) | {:.1} µs ({:.1}–{:.1}) | {errors} |",
            grouped(rps.0 as u64),
            grouped(rps.1 as u64),
            grouped(rps.2 as u64),
            p50.0,
            p50.1,
            p50.2,
            p99.0,
            p99.1,
            p99.2,
            cpu.0,
            cpu.1,
            cpu.2
        )?;
    }
    let [a, b] = &stats;
    writeln!(
        s,
        "| **observer / nginx** (medians) | **{:.2}** (target ≥ 1) | {:.2} | **{:.2}** (target ≤ 1) | {:.2} | |\n",
        b.0.0 / a.0.0,
        b.1.0 / a.1.0,
        b.2.0 / a.2.0,
        b.3.0 / a.3.0
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
        opts.connections
    ));
    s.truncate(s.trim_end().len());
    s.push('\n');
    Ok(s)
}

/// Replaces the section from its heading to the next `## ` heading, or appends it at the end.
pub fn replace_section(doc: &Path, section: &str) -> anyhow::Result<()> {
    let text = fs::read_to_string(doc).with_context(|| format!("reading {}", doc.display()))?;
    let heading = format!("\n{SECTION}\n");
    let updated = match text.find(&heading) {
        Some(start) => {
            let body = start + heading.len();
            let end = text[body..]
                .find("\n## ")
                .map_or(text.len(), |e| body + e + 1);
            let rest = &text[end..];
            format!(
                "{}\n{section}{}{rest}",
                &text[..start],
                if rest.is_empty() { "" } else { "\n" }
            )
        }
        None => format!("{}\n\n{section}", text.trim_end()),
    };
    fs::write(doc, updated).with_context(|| format!("writing {}", doc.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_its_own_section() {
        let dir = std::env::temp_dir().join(format!("proxy-bench-doc-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let doc = dir.join("B.md");
        fs::write(&doc, "# T\n\n## A\n\na\n").unwrap();
        replace_section(&doc, &format!("{SECTION}\n\none\n")).unwrap();
        assert_eq!(
            fs::read_to_string(&doc).unwrap(),
            format!("# T\n\n## A\n\na\n\n{SECTION}\n\none\n")
        );
        fs::write(&doc, format!("# T\n\n{SECTION}\n\nold\n\n## Z\n\nz\n")).unwrap();
        replace_section(&doc, &format!("{SECTION}\n\nnew\n")).unwrap();
        assert_eq!(
            fs::read_to_string(&doc).unwrap(),
            format!("# T\n\n{SECTION}\n\nnew\n\n## Z\n\nz\n")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
