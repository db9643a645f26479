//! Metric handles by label set, kept by one pipeline (`observer run` has one, the proxy one per
//! connection pair). An exchange labelled like an earlier one then costs one lookup in a small
//! map instead of a label lookup per family, each of which takes a lock, hashes every label
//! string and moves a reference count that every thread shares.
//!
//! Observations gather in the handles (prometheus' thread-local counters and histograms, and a
//! delta per gauge) until [`Handles::publish`] adds them to the shared series: the proxy's
//! workers then do not fight over the same atomics several times per request. Whoever owns the
//! handles publishes often enough, and always before a scrape reads the series.
//!
//! Bounded: at most [`MAX_LABEL_SETS`] label sets are kept; past that they are published and
//! the map starts over.

use foldhash::HashMap;

use prometheus::{
    IntGauge,
    local::{LocalHistogram, LocalIntCounter},
};

use super::{EbpfEventKind, labels::RouteId};
use crate::base::{Direction, Role};
use crate::engine::Method;

/// Label sets of `http_*` series kept at once.
pub const MAX_LABEL_SETS: usize = 256;

/// The handles of one pipeline; start with `Handles::default()`.
#[derive(Debug, Default)]
pub struct Handles {
    pub(super) http: HashMap<HttpKey, Http>,
    pub(super) overhead: HashMap<RouteId, Overhead>,
    pub(super) bytes: [[Option<LocalIntCounter>; 2]; 2],
    pub(super) ebpf_events: [Option<LocalIntCounter>; 3],
    pub(super) in_flight: [Gauge; 2],
    pub(super) active: [Gauge; 2],
}

/// A shared gauge and what this pipeline added to it since it last published.
#[derive(Debug, Default)]
pub(super) struct Gauge {
    series: Option<IntGauge>,
    delta: i64,
    /// Whether the series must be made even with nothing to add (a gauge at 0 is shown).
    touched: bool,
}

impl Gauge {
    pub(super) fn add(&mut self, delta: i64) {
        self.delta += delta;
        self.touched = true;
    }

    fn publish(&mut self, make: impl FnOnce() -> IntGauge) {
        if self.touched {
            self.series.get_or_insert_with(make).add(self.delta);
            self.delta = 0;
            self.touched = false;
        }
    }
}

/// The labels of the `http_*` series an exchange without a model touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct HttpKey {
    pub role: Role,
    pub port: u16,
    pub method: Method,
    pub route: RouteId,
    pub status: Option<u16>,
}

/// Each series is made when first observed, as with a label lookup per observation.
#[derive(Debug, Default)]
pub(super) struct Http {
    pub requests: Option<LocalIntCounter>,
    pub duration: Option<LocalHistogram>,
    pub first_byte: Option<LocalHistogram>,
    pub request_size: Option<LocalHistogram>,
    pub response_size: Option<LocalHistogram>,
}

/// Series handles that gather observations until published.
trait Publish {
    fn publish(&self);
}

impl Publish for Http {
    fn publish(&self) {
        if let Some(c) = &self.requests {
            c.flush();
        }
        for h in [
            &self.duration,
            &self.first_byte,
            &self.request_size,
            &self.response_size,
        ]
        .into_iter()
        .flatten()
        {
            h.flush();
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Overhead {
    pub overhead: Option<LocalHistogram>,
    pub first_byte: Option<LocalHistogram>,
}

impl Publish for Overhead {
    fn publish(&self) {
        for h in [&self.overhead, &self.first_byte].into_iter().flatten() {
            h.flush();
        }
    }
}

impl Handles {
    /// The `http_*` handles for `key`.
    pub(super) fn http(&mut self, key: HttpKey) -> &mut Http {
        bounded_entry(&mut self.http, key)
    }

    /// The `gateway_*overhead*` handles for `route`.
    pub(super) fn overhead(&mut self, route: RouteId) -> &mut Overhead {
        bounded_entry(&mut self.overhead, route)
    }

    pub(super) fn bytes(
        &mut self,
        role: Role,
        direction: Direction,
        make: impl FnOnce() -> LocalIntCounter,
    ) -> &LocalIntCounter {
        let direction = match direction {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        };
        self.bytes[role.index()][direction].get_or_insert_with(make)
    }

    pub(super) fn ebpf_events(
        &mut self,
        kind: EbpfEventKind,
        make: impl FnOnce() -> LocalIntCounter,
    ) -> &LocalIntCounter {
        self.ebpf_events[kind as usize].get_or_insert_with(make)
    }

    /// Adds to the in-flight gauge (several pipelines, the proxy's pairs, share it).
    pub fn add_in_flight(&mut self, role: Role, delta: i64) {
        self.in_flight[role.index()].add(delta);
    }

    /// Adds to `tcp_connections_active`.
    pub fn add_connections_active(&mut self, role: Role, delta: i64) {
        self.active[role.index()].add(delta);
    }

    /// Adds what was observed since the last call to the shared series; `gauge` makes the
    /// in-flight (`true`) or active-connections gauge of a role.
    pub(super) fn publish(&mut self, gauge: impl Fn(bool, Role) -> IntGauge) {
        self.http.values().for_each(Publish::publish);
        self.overhead.values().for_each(Publish::publish);
        self.bytes
            .iter()
            .flatten()
            .chain(&self.ebpf_events)
            .flatten()
            .for_each(LocalIntCounter::flush);
        for role in [Role::Gateway, Role::Upstream] {
            self.in_flight[role.index()].publish(|| gauge(true, role));
            self.active[role.index()].publish(|| gauge(false, role));
        }
    }
}

/// The entry for `key`, made empty the first time; a map holding [`MAX_LABEL_SETS`] publishes
/// what it holds and starts over first.
fn bounded_entry<K: std::hash::Hash + Eq, V: Publish + Default>(
    map: &mut HashMap<K, V>,
    key: K,
) -> &mut V {
    if map.len() >= MAX_LABEL_SETS && !map.contains_key(&key) {
        map.values().for_each(Publish::publish);
        map.clear();
    }
    map.entry(key).or_default()
}
