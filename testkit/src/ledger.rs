//! The ledger of exchanges, in the spirit of linkerd2-proxy's integration support: what the
//! clients of a test or a benchmark did, recorded once (per role, by the `code` label each
//! exchange must be counted under), and the checks that compare it with what the daemon's
//! `/metrics` says ([`Check`], [`Expected::checks`], [`Counts`]).
//!
//! A client's exchange is a [`Record`] (the status of the response head, if one came, and
//! whether all of the response came); its `code` label is that status, or `none`. A
//! [`Ledger`] counts records by code for one role; [`Expected`] holds the gateway's and the
//! upstream's.

use std::collections::BTreeMap;

use anyhow::bail;

use crate::metrics::Scrape;

/// The family the ledger is compared with.
pub const REQUESTS: &str = "observer_http_requests_total";
/// The roles a daemon watching an LLM host counts under.
pub const ROLES: [&str; 2] = ["gateway", "upstream"];

/// How one exchange ended for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The status of the response head, `None` when none came.
    pub status: Option<u16>,
    /// The whole response came (its framing said where it ended).
    pub complete: bool,
}

impl Record {
    /// A 200 with every byte of its body.
    pub const OK: Record = Record {
        status: Some(200),
        complete: true,
    };

    /// No response head came (nothing, or not all of one).
    pub const NONE: Record = Record {
        status: None,
        complete: false,
    };

    /// The `code` label the daemon gives this exchange: the status of the response head the
    /// client saw, whether or not the body came whole (an exchange cut after its head keeps
    /// its status), `none` when no head came.
    pub fn code(&self) -> String {
        self.status.map_or("none".to_owned(), |s| s.to_string())
    }

    /// A 200 with every byte of its body.
    pub fn is_ok(&self) -> bool {
        *self == Record::OK
    }
}

/// Exchanges by `code` label, as the daemon must count them for one role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger(BTreeMap<String, u64>);

impl Ledger {
    pub fn add(&mut self, code: &str, n: u64) {
        *self.0.entry(code.to_owned()).or_default() += n;
    }

    pub fn record(&mut self, record: &Record) {
        self.add(&record.code(), 1);
    }

    /// The exchanges under `code`.
    pub fn get(&self, code: &str) -> u64 {
        self.0.get(code).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn codes(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(c, n)| (c.as_str(), *n))
    }

    /// The checks of `observer_http_requests_total` for `role` (and `labels`) that hold when
    /// the daemon counted exactly these exchanges: each code's count, and the sum over all
    /// codes (so that nothing is counted under a code not expected).
    pub fn checks(&self, role: &str, labels: &[(&str, &str)]) -> Vec<Check> {
        let mut all = vec![("role", role)];
        all.extend_from_slice(labels);
        let mut checks: Vec<Check> = self
            .codes()
            .map(|(code, n)| {
                let mut with_code = all.clone();
                with_code.push(("code", code));
                Check::new(REQUESTS, &with_code, n as f64)
            })
            .collect();
        checks.push(Check::new(REQUESTS, &all, self.total() as f64));
        checks
    }
}

/// What the daemon must have counted, per role.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    pub gateway: Ledger,
    pub upstream: Ledger,
}

impl Expected {
    /// One exchange through the gateway: the gateway's and the upstream's, with one code.
    pub fn both(&mut self, record: &Record) {
        self.gateway.record(record);
        self.upstream.record(record);
    }

    /// Each role's ledger, by role name.
    pub fn roles(&self) -> [(&'static str, &Ledger); 2] {
        [(ROLES[0], &self.gateway), (ROLES[1], &self.upstream)]
    }

    /// [`Ledger::checks`] of both roles.
    pub fn checks(&self, labels: &[(&str, &str)]) -> Vec<Check> {
        self.roles()
            .iter()
            .flat_map(|(role, ledger)| ledger.checks(role, labels))
            .collect()
    }

    /// A role whose count (with `labels`) is over what happened, with both figures: counters
    /// only grow, so that never settles.
    pub fn over(&self, scrape: &Scrape, labels: &[(&str, &str)]) -> Option<String> {
        self.roles().into_iter().find_map(|(role, ledger)| {
            let mut all = vec![("role", role)];
            all.extend_from_slice(labels);
            let got = scrape.sum(REQUESTS, &all);
            (got > ledger.total() as f64)
                .then(|| format!("{role}: {got} counted, {} happened", ledger.total()))
        })
    }
}

/// One figure `/metrics` must show: the sum of the series of `name` that have `labels`.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What it is, for messages (by default `name{labels}`).
    pub what: String,
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub want: f64,
}

impl Check {
    pub fn new(name: &str, labels: &[(&str, &str)], want: f64) -> Check {
        let list: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        Check {
            what: format!("{name}{{{}}}", list.join(",")),
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            want,
        }
    }

    /// The same check, called `what` in messages.
    pub fn described(mut self, what: impl Into<String>) -> Check {
        self.what = what.into();
        self
    }

    /// What `scrape` shows.
    pub fn got(&self, scrape: &Scrape) -> f64 {
        let labels: Vec<(&str, &str)> = self
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        scrape.sum(&self.name, &labels)
    }

    /// `None` when `scrape` shows what is wanted, else `what: got G, expected W`.
    pub fn mismatch(&self, scrape: &Scrape) -> Option<String> {
        let got = self.got(scrape);
        (got != self.want).then(|| format!("{}: {got}, expected {}", self.what, self.want))
    }
}

/// The checks that fail on `scrape`, one message each; empty when all hold.
pub fn mismatches(checks: &[Check], scrape: &Scrape) -> Vec<String> {
    checks.iter().filter_map(|c| c.mismatch(scrape)).collect()
}

/// The daemon's counters that the benchmarks compare with their clients' records, at one
/// moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    /// `observer_http_requests_total{role="gateway"}`, every series.
    pub gateway: u64,
    /// `observer_http_requests_total{role="upstream"}`, every series.
    pub upstream: u64,
    /// `observer_ebpf_events_lost_total` by kind.
    pub lost: Vec<(String, u64)>,
    /// `observer_http_parse_errors_total` by `role/reason`, those above 0.
    pub parse_errors: Vec<(String, u64)>,
    /// `observer_ebpf_events_total`, every kind.
    pub events: u64,
}

impl Counts {
    /// Reads them from a scrape; an error when the lost-events family is missing (the daemon
    /// exports every kind from the start).
    pub fn read(scrape: &Scrape) -> anyhow::Result<Counts> {
        let requests = |role| scrape.sum(REQUESTS, &[("role", role)]) as u64;
        let by = |name: &str, keys: &[&str]| -> Vec<(String, u64)> {
            scrape
                .series(name, &[])
                .map(|(labels, v)| {
                    let key: Vec<&str> = keys
                        .iter()
                        .filter_map(|k| labels.get(*k).map(String::as_str))
                        .collect();
                    (key.join("/"), v as u64)
                })
                .collect()
        };
        let lost = by("observer_ebpf_events_lost_total", &["kind"]);
        if lost.is_empty() {
            bail!("/metrics has no observer_ebpf_events_lost_total series");
        }
        Ok(Counts {
            gateway: requests("gateway"),
            upstream: requests("upstream"),
            lost,
            parse_errors: by("observer_http_parse_errors_total", &["role", "reason"])
                .into_iter()
                .filter(|(_, v)| *v > 0)
                .collect(),
            events: scrape.sum("observer_ebpf_events_total", &[]) as u64,
        })
    }

    /// Every kind of lost event, summed.
    pub fn lost_total(&self) -> u64 {
        self.lost.iter().map(|(_, v)| v).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = crate::metrics::PAGE;

    #[test]
    fn records_are_counted_by_code_per_role() {
        let mut want = Expected::default();
        want.both(&Record::OK);
        want.both(&Record {
            status: Some(502),
            complete: false,
        });
        want.gateway.record(&Record::NONE);
        assert_eq!(
            want.gateway.codes().collect::<Vec<_>>(),
            [("200", 1), ("502", 1), ("none", 1)]
        );
        assert_eq!((want.gateway.total(), want.upstream.get("502")), (3, 1));
        assert_eq!(Record::NONE.code(), "none");
        assert!(Record::OK.is_ok() && !Record::NONE.is_ok());
    }

    #[test]
    fn checks_compare_the_ledger_with_a_scrape() {
        let scrape = Scrape::parse(TEXT);
        let mut want = Expected::default();
        want.gateway.add("200", 7);
        want.gateway.add("none", 2);
        want.upstream.add("200", 9);
        let checks = want.checks(&[]);
        assert_eq!(checks.len(), 5);
        assert_eq!(mismatches(&checks, &scrape), Vec::<String>::new());
        assert_eq!(want.over(&scrape, &[]), None);

        // One label more: only the /api/tags series.
        let tags = want.checks(&[("route", "/api/tags")]);
        assert_eq!(
            mismatches(&tags, &scrape),
            [
                r#"observer_http_requests_total{role="gateway",route="/api/tags",code="none"}: 0, expected 2"#,
                r#"observer_http_requests_total{role="gateway",route="/api/tags"}: 7, expected 9"#,
            ]
        );

        let mut fewer = Expected::default();
        fewer.gateway.add("200", 7);
        fewer.upstream.add("200", 9);
        assert_eq!(
            fewer.over(&scrape, &[]).as_deref(),
            Some("gateway: 9 counted, 7 happened")
        );
        let check = Check::new("process_resident_memory_bytes", &[], 1.0).described("memory");
        assert_eq!(
            check.mismatch(&scrape).as_deref(),
            Some("memory: 25000000, expected 1")
        );
    }

    #[test]
    fn reads_the_counts_the_benchmarks_compare() {
        let c = Counts::read(&Scrape::parse(&format!(
            "{TEXT}observer_http_parse_errors_total{{role=\"upstream\",reason=\"bad_head\"}} 4\n\
             observer_http_parse_errors_total{{role=\"gateway\",reason=\"mid_stream\"}} 0\n\
             observer_ebpf_events_total{{kind=\"data\"}} 10\nobserver_ebpf_events_total{{kind=\"open\"}} 2\n"
        )))
        .unwrap();
        assert_eq!((c.gateway, c.upstream, c.events), (9, 9, 12));
        assert_eq!(c.lost_total(), 3);
        assert_eq!(c.lost[0], ("ring_full".to_owned(), 0));
        assert_eq!(c.lost[1], ("odd \"x\", y}".to_owned(), 3));
        assert_eq!(c.parse_errors, [("upstream/bad_head".to_owned(), 4)]);
        assert!(Counts::read(&Scrape::parse("observer_http_requests_total 1\n")).is_err());
    }
}
