//! `cargo xtask bench bystander`: what `observer run` costs a process it does not watch.
//!
//! The kernel programs hook every system call of every process on the host, so a process that
//! never touches a watched port still pays something per call. Measured with `dd if=/dev/zero
//! of=/dev/null bs=1 count=N` (2·N read and write calls of one byte, nothing else): its CPU
//! time (user and system, from `getrusage` of the reaped child) with and without the daemon
//! attached, in alternating rounds once the machine is quiet. The daemon watches the ports of
//! the overhead benchmark's nginx pair (running, idle), so the kernel side holds real
//! listeners and marked processes, as on a serving host.
//!
//! The figure is the CPU added per call: (observer − none) / 2·N for each pair of rounds,
//! median (min–max). Written as the section "Bystander cost".

use std::{fmt, fmt::Write as _, path::Path, process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::{
    common::{
        machine::{self, CpuClock},
        nginx::Gateway,
        parse_options,
        report::{DocArgs, finish, grouped, machine as machine_sentence, paragraph},
        rounds::{self, DISTURBED_CORES, Disturbed, RETRIES},
        stats::Spread,
    },
    observer_run::{ObserverRun, WATCH_ONLY, release_binary},
};

pub const SECTION: &str = "## Bystander cost";
const CONTENDERS: [&str; 2] = ["none", "observer"];
/// Target: nanoseconds added per read or write of an unwatched process.
const ADDED_NS_TARGET: f64 = 40.0;

/// Options after `cargo xtask bench bystander --`.
#[derive(clap::Parser)]
#[command(name = "bench bystander")]
struct Options {
    /// Measured rounds per contender (they alternate).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// dd's `count`: one-byte copies, each a read and a write.
    #[arg(long, default_value_t = 2_000_000)]
    count: u64,
    /// Times a round is run again when other processes used the machine meanwhile.
    #[arg(long, default_value_t = RETRIES)]
    retries: usize,
    #[command(flatten)]
    doc: DocArgs,
}

/// One measured round of one contender.
struct Round {
    contender: usize,
    /// dd's user and system time, in seconds.
    cpu_s: f64,
    wall_s: f64,
    others_cores: f64,
}

impl Disturbed for Round {
    fn others_cores(&self) -> f64 {
        self.others_cores
    }
}

impl fmt::Display for Round {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: dd {:.3} s CPU, {:.3} s wall; others used {:.2} cores",
            CONTENDERS[self.contender], self.cpu_s, self.wall_s, self.others_cores
        )
    }
}

pub fn run(workspace: &Path, args: &[String]) -> anyhow::Result<()> {
    let opts: Options = parse_options("bench bystander", args)?;
    if opts.count == 0 {
        bail!("--count must be at least 1");
    }
    let binary = release_binary(workspace)?;
    let gateway = Gateway::start()?;
    println!(
        "dd if=/dev/zero of=/dev/null bs=1 count={}: {} calls per round",
        opts.count,
        2 * opts.count
    );
    let (rounds, again) = rounds::alternate(opts.rounds, CONTENDERS.len(), opts.retries, |c| {
        machine::wait_for_quiet();
        let observer = (c == 1)
            .then(|| ObserverRun::start(&binary, &gateway.watch(), &WATCH_ONLY))
            .transpose()?;
        let clock = CpuClock::start(&[std::process::id()]);
        let (cpu_s, wall_s) = dd(opts.count)?;
        let others_cores = clock.others_cores();
        if let Some(observer) = observer {
            observer.stop()?;
        }
        Ok(Round {
            contender: c,
            cpu_s,
            wall_s,
            others_cores,
        })
    })?;
    let text = markdown(&opts, &rounds, again)?;
    opts.doc.publish(workspace, &text)
}

/// Runs dd once: its CPU (user + system of the reaped child) and wall time, in seconds.
fn dd(count: u64) -> anyhow::Result<(f64, f64)> {
    let before = machine::children_busy();
    let started = Instant::now();
    let output = Command::new("dd")
        .args([
            "if=/dev/zero",
            "of=/dev/null",
            "bs=1",
            &format!("count={count}"),
        ])
        .output()
        .context("running dd")?;
    let wall = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!(
            "dd failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok((machine::children_busy() - before, wall))
}

/// Nanoseconds per call of each round of `contender`.
fn per_call_ns(opts: &Options, rounds: &[Round], contender: usize) -> Vec<f64> {
    rounds
        .iter()
        .filter(|r| r.contender == contender)
        .map(|r| r.cpu_s * 1e9 / (2 * opts.count) as f64)
        .collect()
}

fn markdown(opts: &Options, rounds: &[Round], again: usize) -> anyhow::Result<String> {
    let mut s = format!("{SECTION}\n\n");
    s += &paragraph(&format!(
        "`xtask/src/bystander_bench.rs`: what `observer run` costs a process it does not watch. \
         `dd if=/dev/zero of=/dev/null bs=1 count={}` makes {} one-byte read and write calls and \
         nothing else; its CPU time (user and system of the reaped child) is measured with no \
         observer and with `observer run --watch GW=gateway --watch UP=upstream {}` (release \
         build) attached, in alternating rounds once the machine is quiet (a round during which \
         other processes used more than {DISTURBED_CORES} cores is run again; {again} were). The \
         daemon watches the overhead benchmark's nginx pair, running and idle. Added per call: \
         (observer − none) ÷ calls for each pair of rounds; median (min–max) over {} rounds.",
        grouped(opts.count),
        grouped(2 * opts.count),
        WATCH_ONLY.join(" "),
        opts.rounds
    ));
    s += "```sh\ncargo xtask bench bystander   # -- --rounds N --count N --retries N --no-doc --doc PATH\n```\n\n";
    s += &paragraph(&machine_sentence());
    s += "| contender | dd CPU | per call |\n|---|---|---|\n";
    for (c, name) in ["no observer", "`observer run` attached"]
        .iter()
        .enumerate()
    {
        let cpu = Spread::of(rounds.iter().filter(|r| r.contender == c).map(|r| r.cpu_s))
            .context("no rounds")?;
        let per_call = Spread::of(per_call_ns(opts, rounds, c)).context("no rounds")?;
        writeln!(
            s,
            "| {name} | {} s | {} ns |",
            cpu.show(3, 1.0),
            per_call.show(0, 1.0)
        )?;
    }
    let added: Vec<f64> = per_call_ns(opts, rounds, 0)
        .iter()
        .zip(per_call_ns(opts, rounds, 1))
        .map(|(none, observer)| observer - none)
        .collect();
    let added = Spread::of(added).context("no rounds")?;
    let met = added.median <= ADDED_NS_TARGET;
    writeln!(
        s,
        "| **added per call** | | **{}** ns (target ≤ {ADDED_NS_TARGET}, {}) |\n",
        added.show(0, 1.0),
        if met { "met" } else { "**missed**" }
    )?;
    Ok(finish(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_reports_the_added_cost_per_call_against_the_target() {
        let opts = Options {
            rounds: 2,
            count: 1_000_000,
            retries: 0,
            doc: DocArgs::default(),
        };
        let round = |contender, cpu_s| Round {
            contender,
            cpu_s,
            wall_s: cpu_s,
            others_cores: 0.0,
        };
        // 2,000,000 calls: 0.5 s is 250 ns a call; 0.56 s and 0.58 s add 30 and 40 ns.
        let rounds = [round(0, 0.5), round(1, 0.56), round(0, 0.5), round(1, 0.58)];
        let text = markdown(&opts, &rounds, 1).unwrap();
        assert!(text.starts_with(SECTION), "{text}");
        assert!(
            text.contains("| no observer | 0.500 (0.500–0.500) s | 250 (250–250) ns |"),
            "{text}"
        );
        assert!(
            text.contains("**35 (30–40)** ns (target ≤ 40, met)"),
            "{text}"
        );
        let slow = [round(0, 0.5), round(1, 0.7), round(0, 0.5), round(1, 0.7)];
        assert!(markdown(&opts, &slow, 0).unwrap().contains("**missed**"));
    }
}
