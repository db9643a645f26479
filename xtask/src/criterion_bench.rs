//! The sections of `docs/BENCHMARKS.md` for the `observer` package's own benchmark targets
//! (`cargo bench`): "Engine throughput" from criterion's results
//! (`target/criterion/engine/mixed_ollama_traffic/new/`) and the traffic's size the benchmark
//! leaves at [`RESULTS_ENV`], and "Daemon memory with 10,000 open connections" from what
//! `daemon_memory` leaves there. Nothing here measures; it reads what the run just wrote and
//! refuses results older than the run.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::common::{
    report::{DocArgs, finish, grouped, machine, mib, paragraph},
    stats::Spread,
};

/// The variable through which a benchmark target is told where to write its results (JSON).
pub const RESULTS_ENV: &str = "OBSERVER_BENCH_RESULTS";
pub const ENGINE_SECTION: &str = "## Engine throughput";
pub const MEMORY_SECTION: &str = "## Daemon memory with 10,000 open connections";
/// The engine's target, in events per second on one core.
const ENGINE_TARGET: f64 = 1e6;

/// Where the target `target` writes its results in this run (removed before the run).
pub fn results_path(workspace: &Path, target: &str) -> PathBuf {
    let dir = workspace.join("target/bench-results");
    let _ = fs::create_dir_all(&dir);
    let path = dir.join(format!("{target}.json"));
    let _ = fs::remove_file(&path);
    path
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn modified(path: &Path) -> anyhow::Result<SystemTime> {
    Ok(fs::metadata(path)
        .with_context(|| format!("{} is missing", path.display()))?
        .modified()?)
}

/// What criterion measured for one benchmark: the time of one iteration per sample, and its
/// estimate of the mean with the 95 % confidence interval, in nanoseconds.
#[derive(Debug, PartialEq)]
struct Criterion {
    per_iteration_ns: Vec<f64>,
    mean_ns: (f64, f64, f64),
    elements: u64,
}

fn criterion(dir: &Path) -> anyhow::Result<Criterion> {
    let sample = read_json(&dir.join("sample.json"))?;
    let estimates = read_json(&dir.join("estimates.json"))?;
    let benchmark = read_json(&dir.join("benchmark.json"))?;
    parse_criterion(&sample, &estimates, &benchmark).context("unexpected criterion results")
}

fn parse_criterion(sample: &Value, estimates: &Value, benchmark: &Value) -> Option<Criterion> {
    let numbers =
        |v: &Value| -> Option<Vec<f64>> { v.as_array()?.iter().map(Value::as_f64).collect() };
    let iters = numbers(&sample["iters"])?;
    let times = numbers(&sample["times"])?;
    if iters.len() != times.len() || iters.is_empty() {
        return None;
    }
    let mean = &estimates["mean"];
    let ci = &mean["confidence_interval"];
    Some(Criterion {
        per_iteration_ns: times.iter().zip(&iters).map(|(t, i)| t / i).collect(),
        mean_ns: (
            mean["point_estimate"].as_f64()?,
            ci["lower_bound"].as_f64()?,
            ci["upper_bound"].as_f64()?,
        ),
        elements: benchmark["throughput"]["Elements"].as_u64()?,
    })
}

/// Writes "Engine throughput" from this run's results.
pub fn engine_section(workspace: &Path, results: &Path, doc: &DocArgs) -> anyhow::Result<()> {
    let dir = workspace.join("target/criterion/engine/mixed_ollama_traffic/new");
    if modified(&dir.join("sample.json"))? < modified(results)? {
        bail!(
            "criterion's results in {} are older than this run (a filter skipped the benchmark?)",
            dir.display()
        );
    }
    let traffic = read_json(results)?;
    let c = criterion(&dir)?;
    doc.publish(workspace, &engine_markdown(&traffic, &c)?)
}

fn engine_markdown(traffic: &Value, c: &Criterion) -> anyhow::Result<String> {
    let field = |k: &str| {
        traffic[k]
            .as_u64()
            .with_context(|| format!("no {k} in the results"))
    };
    let events = field("events")?;
    if events != c.elements {
        bail!(
            "the benchmark says {events} events, criterion {}",
            c.elements
        );
    }
    let per_second = |ns: f64| events as f64 / (ns / 1e9);
    let rates = Spread::of(c.per_iteration_ns.iter().map(|&ns| per_second(ns) / 1e6))
        .context("no samples")?;
    let times = Spread::of(c.per_iteration_ns.iter().map(|&ns| ns / 1e6)).context("no samples")?;
    let (mean, low, high) = c.mean_ns;

    let mut s = format!("{ENGINE_SECTION}\n\n");
    s += &paragraph(&format!(
        "`observer/benches/engine.rs` (criterion): capture events per second through one \
         `Engine` on one core, release build. The traffic is built in memory before measuring \
         and fed in timestamp order, opens and closes included, draining finished exchanges \
         every 1024 events: 800 chat streams of 100–300 chunk writes each, seen on both Ollama's \
         server side and the gateway's client side (three in four Ollama `/api/chat` NDJSON, one \
         in four OpenAI SSE with usage and `[DONE]`), 1,000 keep-alive connections of 1–7 small \
         calls (`/api/tags`, `/api/ps`, `/api/version`, `/api/show`, Content-Length responses), \
         and 100 `/api/embed` calls with 0.3–0.6 MB request bodies (64 KiB writes) and 86 kB \
         responses (two writes), captured as the kernel does (first 1024 and last 256 bytes of \
         each write). In all {} events ({} sends and receives, {:.1} MB moved) and {} exchanges; \
         a check before measuring asserts that every exchange completes and no error is counted.",
        grouped(events),
        grouped(field("data_events")?),
        field("bytes")? as f64 / 1e6,
        grouped(field("exchanges")?),
    ));
    s += "```sh\ncargo xtask bench engine        # = cargo bench -p observer --bench engine\n```\n\n";
    s += &paragraph(&machine());
    s += "| per pass | throughput, criterion's mean (95 % interval) | throughput, median (min–max) of the samples |\n|---|---|---|\n";
    writeln!(
        s,
        "| {} ms | **{:.3} M events/s** ({:.3}–{:.3}) | {} M events/s |\n",
        times.show(1, 1.0),
        per_second(mean) / 1e6,
        per_second(high) / 1e6,
        per_second(low) / 1e6,
        rates.show(3, 1.0),
    )?;
    let list: Vec<String> = c
        .per_iteration_ns
        .iter()
        .map(|&ns| format!("{:.3}", per_second(ns) / 1e6))
        .collect();
    s += &paragraph(&format!(
        "Target: {} events/s; the mean is {:.2} of it. The {} samples in order, M events/s: {}.",
        grouped(ENGINE_TARGET as u64),
        per_second(mean) / ENGINE_TARGET,
        list.len(),
        list.join(", ")
    ));
    Ok(finish(s))
}

/// Writes "Daemon memory with 10,000 open connections" from this run's results.
pub fn daemon_memory_section(
    workspace: &Path,
    results: &Path,
    doc: &DocArgs,
) -> anyhow::Result<()> {
    let results = read_json(results)?;
    doc.publish(workspace, &memory_markdown(&results)?)
}

fn memory_markdown(r: &Value) -> anyhow::Result<String> {
    let field = |k: &str| {
        r[k].as_u64()
            .with_context(|| format!("no {k} in the results"))
    };
    let (conns, ends) = (field("connections")?, field("ends")?);
    let (idle, rss, hwm) = (field("idle_rss_kib")?, field("rss_kib")?, field("hwm_kib")?);
    let target = r["target_mib"].as_f64().context("no target_mib")?;
    let mut s = format!("{MEMORY_SECTION}\n\n");
    s += &paragraph(&format!(
        "`observer/benches/daemon_memory.rs` (root): the real `observer run` (release profile) \
         watches a port; a second process listens on it, the benchmark opens N connections to it \
         and sends on each the head and the start of a request body that never finishes, so both \
         ends of every connection ({} with N = {}) hold engine state: a connection, a pending \
         request and its body scan. It waits until `/status` shows every end open, then reads the \
         daemon's `VmRSS` and `VmHWM`. Target: under {target:.0} MiB.",
        grouped(ends),
        grouped(conns)
    ));
    s += "```sh\ncargo xtask bench daemon-memory   # = cargo bench -p observer --bench daemon_memory; OBSERVER_BENCH_CONNS=N\n```\n\n";
    s += &paragraph(&machine());
    writeln!(
        s,
        "| idle RSS | RSS with {} connections ({} ends) | peak (`VmHWM`) | connections opened in |\n|---|---|---|---|",
        grouped(conns),
        grouped(ends)
    )?;
    writeln!(
        s,
        "| {} | **{}** | {} | {:.1} s |\n",
        mib(idle),
        mib(rss),
        mib(hwm),
        r["opened_seconds"].as_f64().unwrap_or_default()
    )?;
    s += &paragraph(&format!(
        "Peak {}: {} the target of {target:.0} MiB. The idle figure includes the kernel ring \
         buffer's mapping (`--ring-bytes`, 8 MiB by default, mapped twice by the kernel for \
         wrap-around), which counts as the daemon's resident memory; each connection end holding \
         a pending request adds about {} bytes.",
        mib(hwm),
        if (hwm as f64) / 1024.0 < target {
            "under"
        } else {
            "**over**"
        },
        grouped(rss.saturating_sub(idle) * 1024 / ends.max(1))
    ));
    Ok(finish(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn engine_results() -> (Value, Criterion) {
        let sample = json!({"sampling_mode": "Flat", "iters": [2.0, 2.0, 4.0], "times": [500e6, 490e6, 1000e6]});
        let estimates = json!({"mean": {"confidence_interval": {"confidence_level": 0.95,
            "lower_bound": 245e6, "upper_bound": 251e6}, "point_estimate": 247.5e6, "standard_error": 1.0}});
        let benchmark = json!({"throughput": {"Elements": 337938}});
        let c = parse_criterion(&sample, &estimates, &benchmark).unwrap();
        let traffic = json!({"events": 337938, "data_events": 332538, "bytes": 110_700_000u64, "exchanges": 5780});
        (traffic, c)
    }

    #[test]
    fn reads_criterion_results() {
        let (_, c) = engine_results();
        assert_eq!(c.per_iteration_ns, [250e6, 245e6, 250e6]);
        assert_eq!(c.mean_ns, (247.5e6, 245e6, 251e6));
        assert_eq!(c.elements, 337938);
        assert!(
            parse_criterion(
                &json!({"iters": [1.0], "times": []}),
                &json!({}),
                &json!({})
            )
            .is_none()
        );
    }

    #[test]
    fn engine_section_shows_the_figures() {
        let (traffic, c) = engine_results();
        let s = engine_markdown(&traffic, &c).unwrap();
        let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(s.starts_with("## Engine throughput\n\n"), "{s}");
        assert!(
            flat.contains(
                "In all 337,938 events (332,538 sends and receives, 110.7 MB moved) and 5,780"
            ),
            "{s}"
        );
        // 337,938 events in 247.5 ms; the interval's ends swap (a longer time is a lower rate).
        assert!(s.contains("**1.365 M events/s** (1.346–1.379)"), "{s}");
        assert!(s.contains("| 250.0 (245.0–250.0) ms |"), "{s}");
        assert!(flat.contains("1.352, 1.379, 1.352."), "{s}");
        let other = json!({"events": 1, "data_events": 1, "bytes": 1, "exchanges": 1});
        assert!(
            engine_markdown(&other, &c).is_err(),
            "a count from another run"
        );
    }

    #[test]
    fn memory_section_shows_the_figures() {
        let r = json!({"connections": 10000, "ends": 20000, "opened_seconds": 1.25,
            "idle_rss_kib": 26214, "rss_kib": 42394, "hwm_kib": 42394, "target_mib": 64.0});
        let s = memory_markdown(&r).unwrap();
        let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            s.contains("| 25.6 MiB | **41.4 MiB** | 41.4 MiB | 1.2 s |"),
            "{s}"
        );
        assert!(flat.contains("about 828 bytes"), "{s}");
        assert!(
            s.contains("Peak 41.4 MiB: under the target of 64 MiB."),
            "{s}"
        );
    }
}
