//! `wrk` runs (closed loop: each connection sends its next request when the last is answered)
//! and reading their `--latency` report.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::PATH;

/// What one `wrk --latency` run reported.
pub struct WrkResult {
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Completed requests.
    pub requests: u64,
    /// Socket errors and non-2xx/3xx responses.
    pub errors: u64,
}

/// `wrk -t2 -cN -dSs --latency http://ADDR/api/tags`.
pub fn run(addr: SocketAddr, connections: usize, seconds: u64) -> anyhow::Result<WrkResult> {
    let output = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
        ])
        .arg(format!("http://{addr}{PATH}"))
        .stdin(Stdio::null())
        .output()
        .context("cannot run wrk (scripts/setup.sh installs it)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("cannot read wrk's output:\n{text}"))
}

fn parse_wrk(text: &str) -> Option<WrkResult> {
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let errors = text
        .lines()
        .map(str::trim)
        .filter_map(|l| {
            if let Some(socket) = l.strip_prefix("Socket errors:") {
                Some(
                    socket
                        .split(',')
                        .filter_map(|e| e.split_whitespace().last()?.parse::<u64>().ok())
                        .sum::<u64>(),
                )
            } else {
                l.strip_prefix("Non-2xx or 3xx responses:")?
                    .trim()
                    .parse()
                    .ok()
            }
        })
        .sum();
    Some(WrkResult {
        per_second: field("Requests/sec:")?.parse().ok()?,
        p50_us: duration_us(field("50%")?)?,
        p99_us: duration_us(field("99%")?)?,
        requests: text
            .lines()
            .find(|l| l.contains(" requests in "))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?,
        errors,
    })
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.01s`, `1.50m`.
fn duration_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (value, unit) = text.split_at(split);
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        _ => return None,
    };
    Some(value.parse::<f64>().ok()? * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_latency_output() {
        let text = "Running 10s test @ http://127.0.0.1:1/api/tags
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.62ms    1.03ms  30.12ms   90.00%
    Req/Sec    20.30k     1.20k   23.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.90ms
     90%    2.50ms
     99%    1.02s
  404040 requests in 10.00s, 60.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  40400.12
Transfer/sec:      6.00MB
";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.per_second, 40400.12);
        assert_eq!(r.p50_us, 812.0);
        assert_eq!(r.p99_us, 1.02e6);
        assert_eq!(r.requests, 404040);
        assert_eq!(r.errors, 7);
    }
}
