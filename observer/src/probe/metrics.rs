//! The probe's metric families (docs/DESIGN.md#metrics-families): readiness and the last check of
//! each stage per model, what `/api/ps` says is loaded, and `/api/version`.
//!
//! Registered on the daemon's [`Metrics`] registry only when the probe runs, so a daemon with
//! `--no-probe` exports none of them. Writes what it is told; decides nothing.

use std::collections::BTreeSet;

use prometheus::{GaugeVec, IntGaugeVec, Opts};

use super::{
    Stage,
    check::ListedModel,
    state::{CheckResult, Verdict},
};
use crate::metrics::{Metrics, capacity::CapacityBoard};

/// Most models `/api/ps` may add as label values beyond the `--model` ones.
pub const MAX_LISTED_MODELS: usize = 32;

#[derive(Debug, Clone)]
pub struct ProbeMetrics {
    model_ready: IntGaugeVec,
    probe_success: IntGaugeVec,
    probe_duration: GaugeVec,
    probe_first_chunk: GaugeVec,
    model_loaded: IntGaugeVec,
    model_vram: IntGaugeVec,
    model_size: IntGaugeVec,
    upstream_info: IntGaugeVec,
    /// Where the loaded models and their contexts go for the capacity families.
    capacity: CapacityBoard,
    /// The `--model` names: always exported by `model_loaded`, 0 when not loaded.
    configured: Vec<String>,
}

impl ProbeMetrics {
    pub fn register(metrics: &Metrics, configured: &[String]) -> anyhow::Result<ProbeMetrics> {
        let prefix = metrics.prefix();
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace(prefix);
        let probe = ProbeMetrics {
            model_ready: IntGaugeVec::new(
                opts(
                    "model_ready",
                    "1 when the readiness probe finds the model able to answer (every stage passing).",
                ),
                &["model"],
            )?,
            probe_success: IntGaugeVec::new(
                opts(
                    "probe_success",
                    "1 when the last check of this probe stage passed.",
                ),
                &["model", "stage"],
            )?,
            probe_duration: GaugeVec::new(
                opts(
                    "probe_duration_seconds",
                    "How long the last check of this probe stage took.",
                ),
                &["model", "stage"],
            )?,
            probe_first_chunk: GaugeVec::new(
                opts(
                    "probe_first_chunk_seconds",
                    "Request start to the first streamed line in the last generate check.",
                ),
                &["model", "stage"],
            )?,
            model_loaded: IntGaugeVec::new(
                opts("model_loaded", "1 when /api/ps lists the model as loaded."),
                &["model"],
            )?,
            model_vram: IntGaugeVec::new(
                opts(
                    "model_vram_bytes",
                    "GPU memory of a loaded model, from /api/ps.",
                ),
                &["model"],
            )?,
            model_size: IntGaugeVec::new(
                opts(
                    "model_size_bytes",
                    "Memory of a loaded model, from /api/ps.",
                ),
                &["model"],
            )?,
            upstream_info: IntGaugeVec::new(
                opts(
                    "upstream_info",
                    "Always 1: the Ollama version /api/version reports.",
                ),
                &["version"],
            )?,
            capacity: metrics.capacity(),
            configured: configured.to_vec(),
        };
        for family in [
            &probe.model_ready,
            &probe.probe_success,
            &probe.model_loaded,
            &probe.model_vram,
            &probe.model_size,
            &probe.upstream_info,
        ] {
            metrics.register(Box::new(family.clone()))?;
        }
        for family in [&probe.probe_duration, &probe.probe_first_chunk] {
            metrics.register(Box::new(family.clone()))?;
        }
        for model in configured {
            probe.model_loaded.with_label_values(&[model]).set(0);
        }
        Ok(probe)
    }

    pub fn set_verdict(&self, model: &str, verdict: Verdict) {
        self.model_ready
            .with_label_values(&[model])
            .set(i64::from(verdict == Verdict::Ready));
    }

    pub fn record(&self, model: &str, stage: Stage, result: &CheckResult) {
        let labels = [model, stage.as_str()];
        self.probe_success
            .with_label_values(&labels)
            .set(i64::from(result.ok));
        self.probe_duration
            .with_label_values(&labels)
            .set(result.duration_s);
        match result.first_chunk_s {
            Some(seconds) => self
                .probe_first_chunk
                .with_label_values(&labels)
                .set(seconds),
            // A failed generate has no first chunk: no stale value either.
            None => {
                let _ = self.probe_first_chunk.remove_label_values(&labels);
            }
        }
    }

    /// What `/api/ps` lists now: loaded models get their sizes, models no longer listed lose
    /// theirs (and `--model` ones read 0).
    pub fn set_loaded(&self, listed: &[ListedModel]) {
        self.capacity.set_loaded(
            &listed
                .iter()
                .map(|entry| (entry.name.clone(), entry.context_length))
                .collect::<Vec<_>>(),
        );
        let mut names = BTreeSet::new();
        for entry in listed {
            let name = self
                .configured
                .iter()
                .find(|c| entry.is(c))
                .cloned()
                .unwrap_or_else(|| entry.name.clone());
            let extra = names
                .iter()
                .filter(|n| !self.configured.contains(n))
                .count();
            let new_extra = !self.configured.contains(&name) && !names.contains(&name);
            if name.is_empty() || (new_extra && extra >= MAX_LISTED_MODELS) {
                continue;
            }
            self.model_loaded.with_label_values(&[&name]).set(1);
            self.model_vram
                .with_label_values(&[&name])
                .set(entry.size_vram as i64);
            self.model_size
                .with_label_values(&[&name])
                .set(entry.size as i64);
            names.insert(name);
        }
        for family in [&self.model_loaded, &self.model_vram, &self.model_size] {
            for stale in label_values(family, "model") {
                if names.contains(&stale) {
                    continue;
                }
                if std::ptr::eq(family, &self.model_loaded) && self.configured.contains(&stale) {
                    family.with_label_values(&[&stale]).set(0);
                } else {
                    let _ = family.remove_label_values(&[&stale]);
                }
            }
        }
    }

    pub fn set_version(&self, version: &str) {
        for old in label_values(&self.upstream_info, "version") {
            if old != version {
                let _ = self.upstream_info.remove_label_values(&[&old]);
            }
        }
        self.upstream_info.with_label_values(&[version]).set(1);
    }
}

/// The values one label takes in a family now.
fn label_values(family: &IntGaugeVec, label: &str) -> Vec<String> {
    use prometheus::core::Collector as _;
    family
        .collect()
        .iter()
        .flat_map(|mf| mf.get_metric())
        .filter_map(|m| {
            m.get_label()
                .iter()
                .find(|l| l.name() == label)
                .map(|l| l.value().to_owned())
        })
        .collect()
}
