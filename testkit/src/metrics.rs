//! The one Prometheus text reader: the library's own `Scrape` (`observer/src/metrics/scrape.rs`:
//! `parse`, `parse_strict`, `sum`, `series`, `buckets`, `quantile`, ...), compiled into this
//! crate from its source file, as `observer/build.rs` takes `xtask/src/ebpf_object.rs`. Not a
//! dependency on the `observer` library: xtask depends on this crate, and `cargo xtask
//! build-ebpf` must build while `observer` cannot (its kernel object stale).
//!
//! Also: fetching a page from an admin server and reading it strictly.

#[path = "../../observer/src/metrics/scrape.rs"]
mod scrape;

use std::net::SocketAddr;

use anyhow::{Context as _, bail};

pub use scrape::{Scrape, bucket_delta, quantile};

/// `GET /metrics` from the admin server at `admin`, answered 200, read strictly (a line that
/// does not parse is an error naming it).
pub fn fetch(admin: SocketAddr) -> anyhow::Result<Scrape> {
    parse_strict(&fetch_text(admin)?)
}

/// The text of `GET /metrics` from the admin server at `admin`, answered 200.
pub fn fetch_text(admin: SocketAddr) -> anyhow::Result<String> {
    let (status, body) =
        crate::http::get(admin, "/metrics").with_context(|| format!("scraping {admin}"))?;
    if status != 200 {
        bail!("/metrics on {admin} answered {status}: {body}");
    }
    Ok(body)
}

/// [`Scrape::parse_strict`] with the page in the error.
pub fn parse_strict(text: &str) -> anyhow::Result<Scrape> {
    Scrape::parse_strict(text).map_err(|err| anyhow::anyhow!("{err}\n{text}"))
}

/// A page of `/metrics` as the daemon writes one, odd label values included, for the tests of
/// this crate's readers.
#[cfg(test)]
pub(crate) const PAGE: &str = r#"# HELP observer_http_requests_total Requests.
# TYPE observer_http_requests_total counter
observer_http_requests_total{role="gateway",port="1",method="GET",route="/api/tags",code="200"} 7
observer_http_requests_total{role="gateway",port="1",method="GET",route="other",code="none"} 2
observer_http_requests_total{role="upstream",port="2",method="GET",route="/api/tags",code="200"} 9
observer_http_requests_total_created{role="gateway"} 1.7e9
observer_ebpf_events_lost_total{kind="ring_full"} 0
observer_ebpf_events_lost_total{kind="odd \"x\", y}"} 3
observer_http_request_duration_seconds_bucket{role="gateway",le="+Inf"} 9
observer_http_request_duration_seconds_sum{role="gateway"} 0.5
process_resident_memory_bytes 2.5e7 1700000000000
"#;

#[cfg(test)]
mod reading {
    use super::*;

    const TEXT: &str = PAGE;

    #[test]
    fn sums_the_matching_series_of_one_name() {
        let s = parse_strict(TEXT).unwrap();
        let requests = "observer_http_requests_total";
        assert_eq!(s.sum(requests, &[("role", "gateway")]), 9.0);
        assert_eq!(
            s.sum(requests, &[("role", "gateway"), ("code", "200")]),
            7.0
        );
        assert_eq!(s.sum(requests, &[]), 18.0);
        assert_eq!(s.sum(requests, &[("role", "none")]), 0.0);
        assert_eq!(s.sum("observer_http_requests", &[]), 0.0);
    }

    #[test]
    fn reads_escapes_bare_names_timestamps_and_infinity() {
        let s = parse_strict(TEXT).unwrap();
        let lost = "observer_ebpf_events_lost_total";
        assert_eq!(s.sum(lost, &[("kind", "odd \"x\", y}")]), 3.0);
        assert_eq!(s.sum("process_resident_memory_bytes", &[]), 2.5e7);
        let bucket = "observer_http_request_duration_seconds_bucket";
        assert_eq!(s.sum(bucket, &[("le", "+Inf")]), 9.0);
        let sum = "observer_http_request_duration_seconds_sum";
        assert_eq!(s.sum(sum, &[]), 0.5);
        let kinds: Vec<(&str, f64)> = s
            .series(lost, &[])
            .map(|(labels, v)| (labels["kind"].as_str(), v))
            .collect();
        assert_eq!(kinds, [("ring_full", 0.0), ("odd \"x\", y}", 3.0)]);
        let err = parse_strict("observer_x{role=\"gateway\" 1\n").unwrap_err();
        assert!(err.to_string().contains("observer_x"), "{err}");
    }
}
