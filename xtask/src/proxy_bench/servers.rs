//! `observer proxy` as the bench runs it, with testkit's launcher (nginx, the upstream and the
//! gateway it is measured against, is in `crate::common::nginx`), and the count it is compared
//! by; stopped when it drops.

use std::{net::SocketAddr, path::Path};

use anyhow::bail;
use testkit::{ledger::REQUESTS, observer::Proxy};

use crate::observer_run::{WATCH_ONLY, settled};

/// `observer proxy` in front of `upstream` on a free port, its admin listener on another.
pub fn start(binary: &Path, upstream: SocketAddr) -> anyhow::Result<Proxy> {
    Proxy::start(binary, upstream, &WATCH_ONLY)
}

/// The sum of `observer_http_requests_total{role="gateway"}` over its series.
pub fn gateway_requests(proxy: &Proxy) -> anyhow::Result<u64> {
    let scrape = proxy.scrape()?;
    if !scrape.has(REQUESTS) {
        bail!("/metrics has no {REQUESTS} series");
    }
    Ok(scrape.sum(REQUESTS, &[("role", "gateway")]) as u64)
}

/// The gateway count once it stops changing: the engine may still be finishing the last
/// exchanges when wrk exits.
pub fn settled_gateway_requests(proxy: &Proxy) -> anyhow::Result<u64> {
    settled(|| gateway_requests(proxy))
}
