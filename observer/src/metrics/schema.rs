//! What the daemon exports, read from each collector as it is registered: name, type, HELP and
//! label names of every family. It is the source of `observer metrics-reference` and so of the
//! generated table in docs/METRICS.md, which a test keeps equal to the code.
//!
//! Owns only the description. A `Registry` cannot list its collectors, and drops families
//! without samples from `gather`, so the description is taken at registration time instead.

use prometheus::{core::Collector, proto::MetricType};

/// One metric family as exported.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FamilySchema {
    /// The full name, prefix included.
    pub name: String,
    pub kind: &'static str,
    pub help: String,
    /// Label names in the order the family declares them (constant labels last).
    pub labels: Vec<String>,
}

/// The families `collector` exports. A family whose type cannot be read (no `collect()`
/// output of that name) is `untyped`.
pub fn describe(collector: &dyn Collector) -> Vec<FamilySchema> {
    let collected = collector.collect();
    collector
        .desc()
        .into_iter()
        .map(|desc| {
            let kind = collected
                .iter()
                .find(|family| family.name() == desc.fq_name)
                .map_or("untyped", |family| kind_name(family.get_field_type()));
            let mut labels = desc.variable_labels.clone();
            labels.extend(
                desc.const_label_pairs
                    .iter()
                    .map(|pair| pair.name().to_owned()),
            );
            FamilySchema {
                name: desc.fq_name.clone(),
                kind,
                help: desc.help.clone(),
                labels,
            }
        })
        .collect()
}

fn kind_name(kind: MetricType) -> &'static str {
    match kind {
        MetricType::COUNTER => "counter",
        MetricType::GAUGE => "gauge",
        MetricType::HISTOGRAM => "histogram",
        MetricType::SUMMARY => "summary",
        MetricType::UNTYPED => "untyped",
    }
}

/// The sample names a family's series are exposed under: a histogram's `_bucket`, `_sum` and
/// `_count`, else the family name itself.
pub fn sample_names(family: &FamilySchema) -> Vec<String> {
    match family.kind {
        "histogram" | "summary" => {
            let mut names: Vec<String> = ["_sum", "_count"]
                .iter()
                .map(|suffix| format!("{}{suffix}", family.name))
                .collect();
            if family.kind == "histogram" {
                names.insert(0, format!("{}_bucket", family.name));
            }
            names
        }
        _ => vec![family.name.clone()],
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

    use super::*;

    #[test]
    fn reads_name_type_help_and_labels_of_an_empty_family() {
        let counter =
            IntCounterVec::new(Opts::new("seen_total", "Seen.").namespace("x"), &["a", "b"])
                .unwrap();
        assert_eq!(
            describe(&counter),
            vec![FamilySchema {
                name: "x_seen_total".into(),
                kind: "counter",
                help: "Seen.".into(),
                labels: vec!["a".into(), "b".into()],
            }]
        );
        let histogram =
            HistogramVec::new(HistogramOpts::new("wait_seconds", "Waited."), &["r"]).unwrap();
        let described = describe(&histogram);
        assert_eq!(described[0].kind, "histogram");
        assert_eq!(
            sample_names(&described[0]),
            [
                "wait_seconds_bucket",
                "wait_seconds_sum",
                "wait_seconds_count"
            ]
        );
    }
}
