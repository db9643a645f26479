//! What the soak watches over time: the daemon's resident memory and its gauges, sampled at a
//! fixed interval, and the least-squares slope that says whether memory grows.

use std::{
    fs,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use crate::observer_run::{ObserverRun, rss_kib};

/// One reading of the daemon.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Seconds since the soak started.
    pub at_s: f64,
    pub rss_kib: u64,
    /// The daemon's threads (`Threads` in `/proc/PID/status`): with glibc's malloc each new
    /// thread may take an arena of its own, which shows as a step in RSS.
    pub threads: u64,
    /// `observer_tcp_connections_active` and `observer_http_requests_in_flight`, gateway and
    /// upstream.
    pub connections: [f64; 2],
    pub in_flight: [f64; 2],
    /// `observer_ebpf_events_lost_total`, all kinds.
    pub lost: f64,
    /// `observer_http_requests_total{role="gateway"}`.
    pub requests: f64,
}

pub const ROLES: [&str; 2] = ["gateway", "upstream"];

impl Sample {
    pub fn read(observer: &ObserverRun, started: Instant) -> anyhow::Result<Sample> {
        let scrape = observer.scrape()?;
        let sum = |name: &str, labels: &[(&str, &str)]| scrape.sum(name, labels);
        let by_role = |name: &str| ROLES.map(|role| sum(name, &[("role", role)]));
        Ok(Sample {
            at_s: started.elapsed().as_secs_f64(),
            rss_kib: rss_kib(observer)?,
            threads: threads(observer.pid()),
            connections: by_role("observer_tcp_connections_active"),
            in_flight: by_role("observer_http_requests_in_flight"),
            lost: sum("observer_ebpf_events_lost_total", &[]),
            requests: sum("observer_http_requests_total", &[("role", "gateway")]),
        })
    }
}

/// Samples every `every` until `stop`, printing each; a failed reading is printed and skipped.
pub fn sample_until(
    observer: &ObserverRun,
    started: Instant,
    every: Duration,
    stop: &AtomicBool,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next {
            match Sample::read(observer, started) {
                Ok(s) => {
                    println!(
                        "  {:>6.0} s  RSS {:>6} KiB  threads {}  connections {}/{}  in flight {}/{}  lost {}  requests {}",
                        s.at_s,
                        s.rss_kib,
                        s.threads,
                        s.connections[0],
                        s.connections[1],
                        s.in_flight[0],
                        s.in_flight[1],
                        s.lost,
                        s.requests
                    );
                    samples.push(s);
                }
                Err(e) => println!("  sample failed: {e:#}"),
            }
            next += every;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    samples
}

/// `Threads:` of `/proc/PID/status`; 0 if unreadable.
fn threads(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok())
        .unwrap_or(0)
}

/// The least-squares slope of `y` over `x`; `None` for fewer than two distinct `x`.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// RSS growth over the second half of the samples, in KiB per minute.
pub fn rss_slope_second_half(samples: &[Sample]) -> Option<f64> {
    let end = samples.last()?.at_s;
    let points: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.at_s >= end / 2.0)
        .map(|s| (s.at_s / 60.0, s.rss_kib as f64))
        .collect();
    slope(&points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_of_a_line_and_of_flat_noise() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 7.0)).collect();
        assert!((slope(&line).unwrap() - 3.0).abs() < 1e-9);
        let flat = [(0.0, 5.0), (1.0, 6.0), (2.0, 5.0), (3.0, 6.0), (4.0, 5.5)];
        assert!(slope(&flat).unwrap().abs() < 0.2);
        assert_eq!(slope(&[(1.0, 2.0)]), None);
    }

    #[test]
    fn growth_is_fitted_over_the_second_half_in_kib_per_minute() {
        // Flat for 5 minutes, then growing by 60 KiB a minute (1 KiB a second).
        let samples: Vec<Sample> = (0..=120)
            .map(|i| {
                let at_s = i as f64 * 5.0;
                let rss_kib = 20_000
                    + if at_s > 300.0 {
                        (at_s - 300.0) as u64
                    } else {
                        0
                    };
                Sample {
                    at_s,
                    rss_kib,
                    ..Sample::default()
                }
            })
            .collect();
        let slope = rss_slope_second_half(&samples).unwrap();
        assert!((slope - 60.0).abs() < 1.0, "{slope}");
        assert_eq!(rss_slope_second_half(&[]), None);
    }
}
