//! Exposition formats: choosing one from a scraper's `Accept` header, and writing OpenMetrics
//! 1.0 text, which rust-prometheus does not (its `TextEncoder` writes format 0.0.4).
//!
//! Pure functions of gathered `MetricFamily` values: nothing here reads or changes a metric.

use std::fmt::Write as _;

use prometheus::proto::{Metric, MetricFamily, MetricType};

/// Content type of the Prometheus text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How `/metrics` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpositionFormat {
    /// Prometheus text format 0.0.4, the default.
    Text,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl ExpositionFormat {
    /// OpenMetrics when `Accept` names `application/openmetrics-text` with a q above zero and
    /// not below that of an explicit `text/plain`; the text format otherwise (no header,
    /// wildcards, anything unparsable).
    pub fn from_accept(accept: Option<&str>) -> ExpositionFormat {
        let Some(accept) = accept else {
            return ExpositionFormat::Text;
        };
        let mut openmetrics_q = 0.0f32;
        let mut text_q = 0.0f32;
        for range in accept.split(',') {
            let mut params = range.split(';');
            let media_type = params.next().unwrap_or_default().trim();
            let q = params
                .filter_map(|param| param.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, value)| value.trim().parse::<f32>().ok())
                .filter(|q| (0.0..=1.0).contains(q))
                .unwrap_or(0.0);
            if media_type.eq_ignore_ascii_case("application/openmetrics-text") {
                openmetrics_q = openmetrics_q.max(q);
            } else if media_type.eq_ignore_ascii_case("text/plain") {
                text_q = text_q.max(q);
            }
        }
        if openmetrics_q > 0.0 && openmetrics_q >= text_q {
            ExpositionFormat::OpenMetrics
        } else {
            ExpositionFormat::Text
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ExpositionFormat::Text => TEXT_CONTENT_TYPE,
            ExpositionFormat::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

/// Writes `families` as OpenMetrics text, ending with `# EOF`.
///
/// A counter's metadata is named without `_total` and its samples with it. A family that
/// rust-prometheus calls a counter but whose name lacks `_total` cannot be an OpenMetrics
/// counter without renaming its samples (and breaking queries written against the text
/// format), so it is written as `unknown` under its own name.
pub fn encode(families: &[MetricFamily]) -> String {
    let mut out = String::with_capacity(16 * 1024);
    for family in families.iter().filter(|f| !f.get_metric().is_empty()) {
        let name = family.name();
        let (metadata_name, kind) = match family.get_field_type() {
            MetricType::COUNTER => match name.strip_suffix("_total") {
                Some(base) if !base.is_empty() => (base, "counter"),
                _ => (name, "unknown"),
            },
            MetricType::GAUGE => (name, "gauge"),
            MetricType::HISTOGRAM => (name, "histogram"),
            MetricType::SUMMARY => (name, "summary"),
            MetricType::UNTYPED => (name, "unknown"),
        };
        let _ = writeln!(out, "# TYPE {metadata_name} {kind}");
        if !family.help().is_empty() {
            let _ = writeln!(out, "# HELP {metadata_name} {}", escape(family.help()));
        }
        for metric in family.get_metric() {
            write_metric(&mut out, name, family.get_field_type(), metric);
        }
    }
    out.push_str("# EOF\n");
    out
}

fn write_metric(out: &mut String, name: &str, kind: MetricType, metric: &Metric) {
    match kind {
        MetricType::COUNTER => sample(
            out,
            name,
            "",
            metric,
            None,
            &number(metric.get_counter().value()),
        ),
        MetricType::GAUGE => sample(
            out,
            name,
            "",
            metric,
            None,
            &number(metric.get_gauge().value()),
        ),
        MetricType::UNTYPED => sample(out, name, "", metric, None, &number(metric.untyped.value())),
        MetricType::HISTOGRAM => {
            let histogram = metric.get_histogram();
            let mut saw_inf = false;
            for bucket in histogram.get_bucket() {
                let bound = bucket.upper_bound();
                saw_inf |= bound == f64::INFINITY;
                let le = canonical(bound);
                let count = bucket.cumulative_count().to_string();
                sample(out, name, "_bucket", metric, Some(("le", &le)), &count);
            }
            let count = histogram.get_sample_count().to_string();
            if !saw_inf {
                sample(out, name, "_bucket", metric, Some(("le", "+Inf")), &count);
            }
            sample(out, name, "_count", metric, None, &count);
            sample(
                out,
                name,
                "_sum",
                metric,
                None,
                &number(histogram.get_sample_sum()),
            );
        }
        MetricType::SUMMARY => {
            let summary = metric.get_summary();
            for quantile in summary.get_quantile() {
                let q = canonical(quantile.quantile());
                sample(
                    out,
                    name,
                    "",
                    metric,
                    Some(("quantile", &q)),
                    &number(quantile.value()),
                );
            }
            sample(
                out,
                name,
                "_count",
                metric,
                None,
                &summary.sample_count().to_string(),
            );
            sample(
                out,
                name,
                "_sum",
                metric,
                None,
                &number(summary.sample_sum()),
            );
        }
    }
}

fn sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    metric: &Metric,
    extra_label: Option<(&str, &str)>,
    value: &str,
) {
    out.push_str(name);
    out.push_str(suffix);
    let labels = metric
        .get_label()
        .iter()
        .map(|pair| (pair.name(), pair.value()))
        .chain(extra_label);
    for (i, (label, label_value)) in labels.enumerate() {
        out.push(if i == 0 { '{' } else { ',' });
        let _ = write!(out, "{label}=\"{}\"", escape(label_value));
    }
    if !metric.get_label().is_empty() || extra_label.is_some() {
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    let timestamp_ms = metric.timestamp_ms();
    if timestamp_ms != 0 {
        // OpenMetrics timestamps are in seconds.
        let _ = write!(out, " {}", number(timestamp_ms as f64 / 1000.0));
    }
    out.push('\n');
}

/// Escapes a label value or HELP text: backslash, double quote and line feed.
fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(['\\', '"', '\n']) {
        return text.into();
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped.into()
}

/// A sample value: the shortest form that reads back as the same float.
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        value.to_string()
    }
}

/// A number inside a label (`le`, `quantile`): the same float always reads the same, with
/// integers written as `1.0` as OpenMetrics' canonical form asks.
fn canonical(value: f64) -> String {
    if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.1}")
    } else {
        number(value)
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{
        Counter, Gauge, Histogram, HistogramOpts, IntCounterVec, Opts, Registry, proto,
    };

    use super::*;

    #[test]
    fn accept_header_negotiation() {
        use ExpositionFormat::{OpenMetrics, Text};
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let cases = [
            (None, Text),
            (Some(""), Text),
            (Some("*/*"), Text),
            (Some("text/plain"), Text),
            (Some("text/plain;version=0.0.4"), Text),
            (Some(prometheus), OpenMetrics),
            (Some("application/openmetrics-text"), OpenMetrics),
            (
                Some("Application/OpenMetrics-Text; version=1.0.0"),
                OpenMetrics,
            ),
            (Some("application/openmetrics-text;q=0"), Text),
            (Some("application/openmetrics-text;q=0.0, text/plain"), Text),
            (
                Some("text/plain;q=0.9, application/openmetrics-text;q=0.5"),
                Text,
            ),
            (
                Some("text/plain;q=0.5, application/openmetrics-text;q=0.5"),
                OpenMetrics,
            ),
            (Some("application/openmetrics-text;q=bogus"), Text),
            (Some("application/openmetrics-text;q=2"), Text),
        ];
        for (accept, expected) in cases {
            assert_eq!(
                ExpositionFormat::from_accept(accept),
                expected,
                "{accept:?}"
            );
        }
        assert_eq!(
            ExpositionFormat::OpenMetrics.content_type(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert_eq!(
            ExpositionFormat::Text.content_type(),
            "text/plain; version=0.0.4; charset=utf-8"
        );
    }

    #[test]
    fn counters_gauges_and_histograms() {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Requests \"seen\".\nSecond line \\ end."),
            &["route"],
        )
        .unwrap();
        requests.with_label_values(&["/a\"b\\c\nd"]).inc_by(3);
        let hist = Histogram::with_opts(
            HistogramOpts::new("latency_seconds", "Latency.").buckets(vec![0.005, 1.0]),
        )
        .unwrap();
        hist.observe(0.5);
        hist.observe(7.0);
        let gauge = Gauge::new("in_flight", "In flight.").unwrap();
        gauge.set(-2.5);
        registry.register(Box::new(requests)).unwrap();
        registry.register(Box::new(hist)).unwrap();
        registry.register(Box::new(gauge)).unwrap();

        assert_eq!(
            encode(&registry.gather()),
            "# TYPE in_flight gauge\n\
             # HELP in_flight In flight.\n\
             in_flight -2.5\n\
             # TYPE latency_seconds histogram\n\
             # HELP latency_seconds Latency.\n\
             latency_seconds_bucket{le=\"0.005\"} 0\n\
             latency_seconds_bucket{le=\"1.0\"} 1\n\
             latency_seconds_bucket{le=\"+Inf\"} 2\n\
             latency_seconds_count 2\n\
             latency_seconds_sum 7.5\n\
             # TYPE requests counter\n\
             # HELP requests Requests \\\"seen\\\".\\nSecond line \\\\ end.\n\
             requests_total{route=\"/a\\\"b\\\\c\\nd\"} 3\n\
             # EOF\n"
        );
    }

    #[test]
    fn counter_without_total_suffix_is_unknown() {
        let registry = Registry::new();
        let counter = Counter::new("widgets", "Widgets made.").unwrap();
        counter.inc();
        registry.register(Box::new(counter)).unwrap();
        assert_eq!(
            encode(&registry.gather()),
            "# TYPE widgets unknown\n# HELP widgets Widgets made.\nwidgets 1\n# EOF\n"
        );
    }

    #[test]
    fn summaries_and_empty_registries() {
        assert_eq!(encode(&Registry::new().gather()), "# EOF\n");

        // rust-prometheus has no summary metric; a collector could still hand one over.
        let mut quantile = proto::Quantile::default();
        quantile.set_quantile(0.5);
        quantile.set_value(2.0);
        let mut summary = proto::Summary::default();
        summary.set_quantile(vec![quantile]);
        summary.set_sample_count(1);
        summary.set_sample_sum(2.0);
        let mut metric = Metric::default();
        metric.set_summary(summary);
        let mut family = MetricFamily::default();
        family.set_name("rpc_seconds".into());
        family.set_help("RPC time.".into());
        family.set_field_type(MetricType::SUMMARY);
        family.set_metric(vec![metric]);
        assert_eq!(
            encode(&[family]),
            "# TYPE rpc_seconds summary\n\
             # HELP rpc_seconds RPC time.\n\
             rpc_seconds{quantile=\"0.5\"} 2\n\
             rpc_seconds_count 1\n\
             rpc_seconds_sum 2\n\
             # EOF\n"
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(canonical(1.0), "1.0");
        assert_eq!(canonical(0.0001), "0.0001");
        assert_eq!(canonical(67_108_864.0), "67108864.0");
        assert_eq!(canonical(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(3.0), "3");
    }
}
