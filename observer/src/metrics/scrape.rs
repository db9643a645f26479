//! Reading a Prometheus text page (the daemon's own `/metrics`) back: the text format
//! parsed into samples, and the sums, deltas and quantiles that `observer demo`'s summary
//! and the tests read from it.
//!
//! Owns no state; a [`Scrape`] is one parsed page. Quantiles follow `histogram_quantile`:
//! linear interpolation inside the bucket that holds the rank.

use std::collections::BTreeMap;

/// One parsed exposition page.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    samples: Vec<Sample>,
}

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Scrape {
    /// Parses text format 0.0.4. Comment lines and lines that do not parse are skipped: the
    /// page comes from our own daemon, and a summary must not die on one odd line.
    pub fn parse(text: &str) -> Scrape {
        let samples = sample_lines(text).filter_map(parse_line).collect();
        Scrape { samples }
    }

    /// As [`Scrape::parse`], but a line that does not parse is an error naming it: for tests,
    /// where an odd line is a finding.
    pub fn parse_strict(text: &str) -> Result<Scrape, String> {
        let samples = sample_lines(text)
            .map(|line| parse_line(line).ok_or_else(|| format!("not a sample line: {line:?}")))
            .collect::<Result<_, _>>()?;
        Ok(Scrape { samples })
    }

    /// Whether any series of `name` is present.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        want: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of every series of `name` whose labels include `want`; 0 when none does.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        add(self.matching(name, want).map(|s| s.value))
    }

    /// As [`Scrape::sum`], counting only series whose `label` value passes `keep`.
    pub fn sum_where(
        &self,
        name: &str,
        want: &[(&str, &str)],
        label: &str,
        keep: impl Fn(&str) -> bool,
    ) -> f64 {
        add(self
            .matching(name, want)
            .filter(|s| s.labels.get(label).is_some_and(|v| keep(v)))
            .map(|s| s.value))
    }

    /// Every series of `name` whose labels include `want`: its labels and its value, in the
    /// order of the page.
    pub fn series<'a>(
        &'a self,
        name: &'a str,
        want: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a BTreeMap<String, String>, f64)> + 'a {
        self.matching(name, want).map(|s| (&s.labels, s.value))
    }

    /// Each value of `label` among the series of `name`, with that series' value.
    pub fn by_label(&self, name: &str, label: &str) -> Vec<(String, f64)> {
        self.matching(name, &[])
            .filter_map(|s| Some((s.labels.get(label)?.clone(), s.value)))
            .collect()
    }

    /// The cumulative buckets of histogram `family` (its `_bucket` series summed over every
    /// other label), by upper bound.
    pub fn buckets(&self, family: &str, want: &[(&str, &str)]) -> Vec<(f64, f64)> {
        let name = format!("{family}_bucket");
        let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for sample in self.matching(&name, want) {
            let Some(le) = sample.labels.get("le").and_then(|le| parse_value(le)) else {
                continue;
            };
            // Order by the bound; bounds are positive, so their bits sort like the numbers.
            by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += sample.value;
        }
        by_le.into_values().collect()
    }
}

/// The sum of `values`, folded from +0: `Iterator::sum` of no values is -0, which prints as
/// "-0".
fn add(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0, |sum, v| sum + v)
}

/// Bucket counts of `now` minus those of `before` (a window's histogram); a bound missing
/// before counts from 0.
pub fn bucket_delta(now: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    now.iter()
        .map(|&(le, count)| {
            let old = before
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, c)| *c);
            (le, (count - old).max(0.0))
        })
        .collect()
}

/// The `q` quantile of cumulative `buckets`, as Prometheus' `histogram_quantile` computes it;
/// `None` without observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                // Beyond the last finite bound: the bound is all that is known.
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            let fraction = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * fraction);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

fn sample_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(at) => line.split_at(at),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let end = parse_labels(body, &mut labels)?;
        &body[end..]
    } else {
        rest
    };
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Reads `k="v",…}` into `labels`; returns the offset just past the `}`.
fn parse_labels(body: &str, labels: &mut BTreeMap<String, String>) -> Option<usize> {
    let bytes = body.as_bytes();
    let mut at = 0;
    loop {
        while bytes.get(at) == Some(&b',') || bytes.get(at) == Some(&b' ') {
            at += 1;
        }
        if bytes.get(at) == Some(&b'}') {
            return Some(at + 1);
        }
        let eq = at + body[at..].find('=')?;
        let key = body[at..eq].to_owned();
        if bytes.get(eq + 1) != Some(&b'"') {
            return None;
        }
        let mut value = String::new();
        let mut i = eq + 2;
        loop {
            match *bytes.get(i)? {
                b'"' => break,
                b'\\' => {
                    match *bytes.get(i + 1)? {
                        b'n' => value.push('\n'),
                        other => value.push(other as char),
                    }
                    i += 2;
                }
                _ => {
                    let ch = body[i..].chars().next()?;
                    value.push(ch);
                    i += ch.len_utf8();
                }
            }
        }
        labels.insert(key, value);
        at = i + 1;
    }
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP observer_http_requests_total x
# TYPE observer_http_requests_total counter
observer_http_requests_total{role="gateway",port="18789",method="POST",route="/api/chat",code="200"} 7
observer_http_requests_total{role="gateway",port="18789",method="POST",route="/api/chat",code="500"} 1
observer_http_requests_total{role="upstream",port="11434",method="POST",route="/api/chat",code="200"} 8
observer_model_ready{model="a \"quoted\" name"} 1
h_bucket{role="gateway",le="0.1"} 1
h_bucket{role="gateway",le="1"} 3
h_bucket{role="gateway",le="+Inf"} 4
h_bucket{role="upstream",le="0.1"} 2
h_bucket{role="upstream",le="1"} 2
h_bucket{role="upstream",le="+Inf"} 2
"#;

    #[test]
    fn sums_series_by_label_subset() {
        let page = Scrape::parse(PAGE);
        assert_eq!(page.sum("observer_http_requests_total", &[]), 16.0);
        assert_eq!(
            page.sum("observer_http_requests_total", &[("role", "gateway")]),
            8.0
        );
        let ok = page.sum_where(
            "observer_http_requests_total",
            &[("role", "gateway")],
            "code",
            |c| c.starts_with('2'),
        );
        assert_eq!(ok, 7.0);
        assert_eq!(
            page.by_label("observer_model_ready", "model"),
            [("a \"quoted\" name".to_owned(), 1.0)]
        );
    }

    #[test]
    fn sums_of_no_series_are_zero_and_series_keep_their_labels() {
        let page = Scrape::parse(PAGE);
        let none = page.sum("observer_http_requests_total", &[("role", "none")]);
        assert!(none == 0.0 && none.is_sign_positive(), "{none}");
        assert_eq!(format!("{}", page.sum("absent", &[])), "0");
        let upstream: Vec<(String, f64)> = page
            .series("h_bucket", &[("role", "upstream")])
            .map(|(labels, value)| (labels["le"].clone(), value))
            .collect();
        assert_eq!(
            upstream,
            [
                ("0.1".to_owned(), 2.0),
                ("1".to_owned(), 2.0),
                ("+Inf".to_owned(), 2.0)
            ]
        );
        assert_eq!(page.series("observer_model_ready", &[]).count(), 1);
    }

    #[test]
    fn strict_parsing_names_the_odd_line() {
        assert!(Scrape::parse_strict(PAGE).unwrap().has("h_bucket"));
        let odd = format!("{PAGE}observer_x{{role=\"gateway\" 1\n");
        let err = Scrape::parse_strict(&odd).unwrap_err();
        assert!(err.contains("observer_x"), "{err}");
        assert!(!Scrape::parse(&odd).has("observer_x"));
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let page = Scrape::parse(PAGE);
        let gateway = page.buckets("h", &[("role", "gateway")]);
        assert_eq!(gateway, [(0.1, 1.0), (1.0, 3.0), (f64::INFINITY, 4.0)]);
        // rank 2 of 4 lies halfway through the (0.1, 1] bucket.
        assert!((quantile(0.5, &gateway).unwrap() - 0.55).abs() < 1e-9);
        // rank 3.8 is in +Inf: the last finite bound.
        assert_eq!(quantile(0.95, &gateway), Some(1.0));
        assert_eq!(quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]), None);
        let all = page.buckets("h", &[]);
        assert_eq!(all, [(0.1, 3.0), (1.0, 5.0), (f64::INFINITY, 6.0)]);
        let window = bucket_delta(&all, &gateway);
        assert_eq!(window, [(0.1, 2.0), (1.0, 2.0), (f64::INFINITY, 2.0)]);
    }
}
