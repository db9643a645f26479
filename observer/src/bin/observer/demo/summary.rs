//! The demo's live summary: computed from the observer's own `/metrics` (what an operator's
//! Prometheus would see), over a sliding window, and drawn in place on a terminal.
//!
//! Owns the window of scrapes and the arithmetic on them; it never looks at the traffic
//! itself, except for the client's own request count shown beside the observer's.

use std::{collections::VecDeque, fmt::Write as _, time::Duration};

use observer::metrics::scrape::{Scrape, bucket_delta, quantile};

/// Rates (requests/s, tokens/s) are over this much of the most recent history.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Ratios and quantiles are over this much.
const LATENCY_WINDOW: Duration = Duration::from_secs(30);

const REQUESTS: &str = "observer_http_requests_total";
const DURATION: &str = "observer_http_request_duration_seconds";
const FIRST_CHUNK: &str = "gen_ai_server_time_to_first_token_seconds";
const TOKENS: &str = "gen_ai_client_token_usage_sum";
const IN_FLIGHT: &str = "observer_http_requests_in_flight";
const PHASE: &str = "observer_llm_request_phase_seconds";
const SLOTS: &str = "observer_llm_slots";
const WAITING: &str = "observer_llm_requests_waiting";
const REJECTED: &str = "observer_llm_rejected_requests_total";
/// The phases of a request in the model server, in the order they happen.
const PHASES: [&str; 5] = ["queue", "load", "prefill", "decode", "outside"];
const UPSTREAM: (&str, &str) = ("role", "upstream");
const READY: &str = "observer_model_ready";
const LOST: &str = "observer_ebpf_events_lost_total";
const GATEWAY: (&str, &str) = ("role", "gateway");

/// What one summary shows.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct View {
    /// Seconds the view covers.
    pub seconds: f64,
    /// Requests the observer counted at the gateway, in the view.
    pub requests: u64,
    pub requests_per_second: f64,
    /// 2xx share of the requests, `None` without requests.
    pub success_ratio: Option<f64>,
    pub latency_p50_seconds: Option<f64>,
    pub latency_p95_seconds: Option<f64>,
    pub first_chunk_p50_seconds: Option<f64>,
    pub first_chunk_p95_seconds: Option<f64>,
    pub completion_tokens_per_second: f64,
    pub in_flight: u64,
    /// Mean seconds per request in each phase (queue, load, prefill, decode, outside Ollama),
    /// over the requests of the view that reported Ollama's timings.
    pub phases: Vec<(&'static str, f64)>,
    /// The model server's slots (`None` before its settings were read), its requests in
    /// flight and those waiting for a slot now.
    pub slots: Option<u64>,
    pub upstream_in_flight: u64,
    pub waiting: u64,
    /// Requests the model server refused (queue full, prompt too long) in the view.
    pub rejected: u64,
    /// Each probed model and whether it is ready now.
    pub models_ready: Vec<(String, bool)>,
    /// Kernel events lost since the observer started.
    pub events_lost: u64,
}

/// The scrapes of the run so far (the first, and those inside the latency window).
#[derive(Debug, Default)]
pub struct History {
    first: Option<(Duration, Scrape)>,
    recent: VecDeque<(Duration, Scrape)>,
}

impl History {
    /// Adds a scrape taken `at` since the demo started.
    pub fn push(&mut self, at: Duration, scrape: Scrape) {
        if self.first.is_none() {
            self.first = Some((at, scrape.clone()));
        }
        self.recent.push_back((at, scrape));
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| at.saturating_sub(*t) > LATENCY_WINDOW)
        {
            self.recent.pop_front();
        }
    }

    /// The live view: rates over the last few seconds, ratios and quantiles over the last 30.
    pub fn live(&self) -> Option<View> {
        let (now_at, now) = self.recent.back()?;
        let rate = self
            .recent
            .iter()
            .find(|(t, _)| now_at.saturating_sub(*t) <= RATE_WINDOW)?;
        let window = self.recent.front()?;
        Some(view(now, since(*now_at, window), since(*now_at, rate)))
    }

    /// The whole run: from the first scrape to the last.
    pub fn total(&self) -> Option<View> {
        let (first_at, first) = self.first.as_ref()?;
        let (now_at, now) = self.recent.back()?;
        let whole = (first, now_at.saturating_sub(*first_at));
        Some(view(now, whole, whole))
    }
}

/// A scrape of the history, with how long before `now_at` it was taken.
fn since(now_at: Duration, (at, scrape): &(Duration, Scrape)) -> (&Scrape, Duration) {
    (scrape, now_at.saturating_sub(*at))
}

fn completion_tokens(scrape: &Scrape) -> f64 {
    scrape.sum(TOKENS, &[GATEWAY, ("gen_ai_token_type", "output")])
}

/// Mean seconds per phase between two scrapes; phases without requests are left out.
fn phases(now: &Scrape, base: &Scrape) -> Vec<(&'static str, f64)> {
    PHASES
        .into_iter()
        .filter_map(|phase| {
            let want = [("phase", phase)];
            let delta = |suffix: &str| {
                let name = format!("{PHASE}{suffix}");
                now.sum(&name, &want) - base.sum(&name, &want)
            };
            let count = delta("_count");
            (count > 0.0).then(|| (phase, delta("_sum") / count))
        })
        .collect()
}

/// `now` against two earlier scrapes, each with how long before `now` it was taken: counts,
/// ratios and quantiles over `window`, rates over `rate`.
fn view(now: &Scrape, window: (&Scrape, Duration), rate: (&Scrape, Duration)) -> View {
    let (base, span) = window;
    let seconds = span.as_secs_f64();
    let requests = now.sum(REQUESTS, &[GATEWAY]) - base.sum(REQUESTS, &[GATEWAY]);
    let succeeded = now.sum_where(REQUESTS, &[GATEWAY], "code", |c| c.starts_with('2'))
        - base.sum_where(REQUESTS, &[GATEWAY], "code", |c| c.starts_with('2'));
    let latency = bucket_delta(
        &now.buckets(DURATION, &[GATEWAY]),
        &base.buckets(DURATION, &[GATEWAY]),
    );
    let first_chunk = bucket_delta(
        &now.buckets(FIRST_CHUNK, &[GATEWAY]),
        &base.buckets(FIRST_CHUNK, &[GATEWAY]),
    );
    let (rate_base, rate_span) = rate;
    let rate_seconds = rate_span.as_secs_f64();
    let per_second = |n: f64| {
        if rate_seconds > 0.0 {
            n / rate_seconds
        } else {
            0.0
        }
    };
    View {
        seconds,
        requests: requests.max(0.0) as u64,
        requests_per_second: per_second(
            now.sum(REQUESTS, &[GATEWAY]) - rate_base.sum(REQUESTS, &[GATEWAY]),
        ),
        success_ratio: (requests > 0.0).then(|| succeeded / requests),
        latency_p50_seconds: quantile(0.5, &latency),
        latency_p95_seconds: quantile(0.95, &latency),
        first_chunk_p50_seconds: quantile(0.5, &first_chunk),
        first_chunk_p95_seconds: quantile(0.95, &first_chunk),
        completion_tokens_per_second: per_second(
            completion_tokens(now) - completion_tokens(rate_base),
        ),
        in_flight: now.sum(IN_FLIGHT, &[GATEWAY]).max(0.0) as u64,
        phases: phases(now, base),
        slots: now.has(SLOTS).then(|| now.sum(SLOTS, &[]) as u64),
        upstream_in_flight: now.sum(IN_FLIGHT, &[UPSTREAM]).max(0.0) as u64,
        waiting: now.sum(WAITING, &[]).max(0.0) as u64,
        rejected: (now.sum(REJECTED, &[UPSTREAM]) - base.sum(REJECTED, &[UPSTREAM])).max(0.0)
            as u64,
        models_ready: now
            .by_label(READY, "model")
            .into_iter()
            .map(|(model, value)| (model, value == 1.0))
            .collect(),
        events_lost: now.sum(LOST, &[]) as u64,
    }
}

fn seconds(value: Option<f64>) -> String {
    match value {
        None => "-".into(),
        Some(s) if s < 1.0 => format!("{:.0} ms", s * 1000.0),
        Some(s) => format!("{s:.2} s"),
    }
}

fn percent(value: Option<f64>) -> String {
    value.map_or("-".into(), |r| format!("{:.1} %", r * 100.0))
}

/// `queue 12 ms  load 0 ms  prefill 80 ms  decode 1.20 s  outside 1 ms`, or `-` before any.
fn time_split(view: &View) -> String {
    if view.phases.is_empty() {
        return "-".into();
    }
    view.phases
        .iter()
        .map(|(phase, s)| format!("{phase} {}", seconds(Some(*s))))
        .collect::<Vec<_>>()
        .join("  ")
}

/// `5 in flight / 4 slots, 1 waiting, 0 refused`.
fn capacity(view: &View) -> String {
    let slots = view
        .slots
        .map_or("? slots".into(), |n| format!("{n} slots"));
    format!(
        "{} in flight / {slots}, {} waiting, {} refused",
        view.upstream_in_flight, view.waiting, view.rejected
    )
}

/// Whether every probed model is ready (false when none is probed yet).
pub fn all_ready(view: &View) -> bool {
    !view.models_ready.is_empty() && view.models_ready.iter().all(|(_, ready)| *ready)
}

fn readiness(view: &View) -> String {
    if view.models_ready.is_empty() {
        return "no verdict yet".into();
    }
    view.models_ready
        .iter()
        .map(|(model, ready)| format!("{model} {}", if *ready { "ready" } else { "NOT READY" }))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The lines of the live summary.
pub fn render_live(view: &View, elapsed: Duration, client_sent: u64) -> Vec<String> {
    vec![
        format!(
            "  {:>5.0}s  requests/s {:>6.1}   success {:>7}   in flight {:>3}   tokens/s {:>7.1}",
            elapsed.as_secs_f64(),
            view.requests_per_second,
            percent(view.success_ratio),
            view.in_flight,
            view.completion_tokens_per_second,
        ),
        format!(
            "          latency p50 {:>8}  p95 {:>8}   first chunk p50 {:>8}  p95 {:>8}   (last {:.0}s)",
            seconds(view.latency_p50_seconds),
            seconds(view.latency_p95_seconds),
            seconds(view.first_chunk_p50_seconds),
            seconds(view.first_chunk_p95_seconds),
            view.seconds,
        ),
        format!("          time split  {}", time_split(view)),
        format!("          Ollama      {}", capacity(view)),
        format!(
            "          model {}   events lost {}   client sent {client_sent}",
            readiness(view),
            view.events_lost,
        ),
    ]
}

/// The summary printed at the end: the whole run, and the client's count beside the observer's.
pub fn render_total(view: &View, client_sent: u64, client_succeeded: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "summary of the run ({:.0}s):", view.seconds);
    let _ = writeln!(
        out,
        "  requests      {} counted by the observer at the gateway ({:.1}/s); the clients sent {client_sent}, {client_succeeded} of them answered 2xx",
        view.requests, view.requests_per_second
    );
    let _ = writeln!(out, "  success       {}", percent(view.success_ratio));
    let _ = writeln!(
        out,
        "  latency       p50 {}   p95 {}",
        seconds(view.latency_p50_seconds),
        seconds(view.latency_p95_seconds)
    );
    let _ = writeln!(
        out,
        "  first chunk   p50 {}   p95 {}",
        seconds(view.first_chunk_p50_seconds),
        seconds(view.first_chunk_p95_seconds)
    );
    let _ = writeln!(
        out,
        "  tokens/s      {:.1} (completion tokens, all users)",
        view.completion_tokens_per_second
    );
    let _ = writeln!(
        out,
        "  time split    {} (mean per request)",
        time_split(view)
    );
    let _ = writeln!(out, "  Ollama        {}", capacity(view));
    let _ = writeln!(out, "  model         {}", readiness(view));
    let _ = writeln!(out, "  events lost   {}", view.events_lost);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(requests_ok: u64, requests_err: u64, tokens: u64, ready: u8) -> Scrape {
        Scrape::parse(&format!(
            "{REQUESTS}{{role=\"gateway\",code=\"200\"}} {requests_ok}\n\
             {REQUESTS}{{role=\"gateway\",code=\"500\"}} {requests_err}\n\
             {REQUESTS}{{role=\"upstream\",code=\"200\"}} 999\n\
             {TOKENS}{{role=\"gateway\",gen_ai_token_type=\"output\",gen_ai_request_model=\"m\"}} {tokens}\n\
             {TOKENS}{{role=\"gateway\",gen_ai_token_type=\"input\",gen_ai_request_model=\"m\"}} 5000\n\
             {PHASE}_sum{{model=\"m\",phase=\"queue\"}} {queue}\n\
             {PHASE}_count{{model=\"m\",phase=\"queue\"}} {requests_ok}\n\
             {PHASE}_sum{{model=\"m\",phase=\"decode\"}} {requests_ok}\n\
             {PHASE}_count{{model=\"m\",phase=\"decode\"}} {requests_ok}\n\
             {SLOTS} 4\n\
             {WAITING} 2\n\
             {IN_FLIGHT}{{role=\"upstream\"}} 6\n\
             {REJECTED}{{role=\"upstream\",model=\"m\",reason=\"server_busy\"}} {requests_err}\n\
             {DURATION}_bucket{{role=\"gateway\",le=\"1\"}} {requests_ok}\n\
             {DURATION}_bucket{{role=\"gateway\",le=\"+Inf\"}} {}\n\
             {READY}{{model=\"m\"}} {ready}\n\
             {IN_FLIGHT}{{role=\"gateway\"}} 3\n",
            requests_ok + requests_err,
            queue = requests_ok as f64 * 0.1,
        ))
    }

    #[test]
    fn live_rates_use_the_last_seconds_and_totals_the_whole_run() {
        let mut history = History::default();
        history.push(Duration::from_secs(0), page(0, 0, 0, 0));
        history.push(Duration::from_secs(10), page(50, 0, 1000, 1));
        history.push(Duration::from_secs(15), page(90, 10, 2000, 1));
        let live = history.live().unwrap();
        // Rate window: 10 s → 15 s.
        assert_eq!(live.requests_per_second, 10.0);
        assert_eq!(live.completion_tokens_per_second, 200.0);
        // Ratios over everything within 30 s.
        assert_eq!(live.requests, 100);
        assert_eq!(live.success_ratio, Some(0.9));
        assert_eq!(live.in_flight, 3);
        assert!(all_ready(&live));
        let total = history.total().unwrap();
        assert_eq!(total.requests, 100);
        assert!((total.requests_per_second - 100.0 / 15.0).abs() < 1e-9);
        let text = render_total(&total, 100, 90);
        assert!(text.contains("100 counted by the observer"), "{text}");
        assert!(text.contains("events lost   0"), "{text}");
        assert!(text.contains("m ready"), "{text}");
        // 100 requests waited 0.1 s each and decoded for 1 s each.
        assert_eq!(total.phases, vec![("queue", 0.1), ("decode", 1.0)]);
        assert!(
            text.contains("time split    queue 100 ms  decode 1.00 s"),
            "{text}"
        );
        assert!(
            text.contains("Ollama        6 in flight / 4 slots, 2 waiting, 10 refused"),
            "{text}"
        );
    }

    #[test]
    fn old_scrapes_leave_the_window_but_not_the_total() {
        let mut history = History::default();
        history.push(Duration::from_secs(0), page(10, 0, 0, 0));
        history.push(Duration::from_secs(40), page(20, 0, 0, 0));
        history.push(Duration::from_secs(60), page(30, 0, 0, 0));
        assert_eq!(history.live().unwrap().requests, 10);
        assert_eq!(history.total().unwrap().requests, 20);
        assert!(!all_ready(&history.live().unwrap()));
    }
}
