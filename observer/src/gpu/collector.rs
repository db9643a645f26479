//! [`GpuCollector`]: the `gpu_*` metric families, rendered at scrape time from the latest
//! reading (docs/DESIGN.md#metrics-families).
//!
//! Owns the mapping from a [`GpuSnapshot`] to samples: which family, which labels, which value.
//! Each update replaces every sample, so a process that left a GPU, or a value a GPU stopped
//! giving, is gone at the next scrape; [`GpuCollector::clear`] leaves no sample at all. It does
//! not read NVML or `/proc` itself: the caller passes a reading and the name and role lookups.

use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use prometheus::{GaugeVec, Opts, core::Collector, core::Desc, proto::MetricFamily};

use super::reading::GpuSnapshot;
use crate::base::Role;

/// The `role` of a GPU process that serves no watched listener.
const NO_ROLE: &str = "other";

const GPU_LABELS: &[&str] = &["gpu", "uuid"];

/// The families, in the order of [`Family`].
const FAMILIES: [(&str, &str, &[&str]); 8] = [
    (
        "gpu_memory_used_bytes",
        "GPU memory allocated, in bytes (NVML).",
        GPU_LABELS,
    ),
    (
        "gpu_memory_total_bytes",
        "GPU memory installed, in bytes (NVML).",
        GPU_LABELS,
    ),
    (
        "gpu_utilization_ratio",
        "Fraction of the last NVML sample period during which a kernel ran on the GPU (0 to 1).",
        GPU_LABELS,
    ),
    (
        "gpu_memory_utilization_ratio",
        "Fraction of the last NVML sample period during which GPU memory was read or written (0 to 1).",
        GPU_LABELS,
    ),
    (
        "gpu_temperature_celsius",
        "GPU die temperature, in degrees Celsius (NVML).",
        GPU_LABELS,
    ),
    (
        "gpu_power_watts",
        "GPU power draw, in watts (NVML); absent where the board does not report it.",
        GPU_LABELS,
    ),
    (
        "gpu_process_memory_bytes",
        "GPU memory used by a process, in bytes; role is the role of the watched listener the process or its parent owns (upstream, gateway), else other.",
        &["gpu", "pid", "comm", "role"],
    ),
    (
        "gpu_info",
        "GPUs seen through NVML, always 1; labels name the GPU and the driver.",
        &["gpu", "uuid", "name", "driver_version"],
    ),
];

/// Index into [`FAMILIES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    MemoryUsed,
    MemoryTotal,
    Utilization,
    MemoryUtilization,
    Temperature,
    Power,
    ProcessMemory,
    Info,
}

/// One value of one family, with its label values in the family's label order.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    family: Family,
    labels: Vec<String>,
    value: f64,
}

/// The `gpu_*` families. Cheap to clone: clones share the latest samples, so one clone can be
/// registered while another is updated.
#[derive(Clone)]
pub struct GpuCollector {
    shared: Arc<Shared>,
}

struct Shared {
    /// Never hold samples; they give `desc()` and the options fresh vectors are built from.
    templates: Vec<(Opts, GaugeVec)>,
    samples: Mutex<Vec<Sample>>,
}

impl GpuCollector {
    pub fn new(prefix: &str) -> anyhow::Result<GpuCollector> {
        let templates = FAMILIES
            .iter()
            .map(|&(name, help, labels)| {
                let opts = Opts::new(name, help).namespace(prefix);
                let vec = GaugeVec::new(opts.clone(), labels)
                    .with_context(|| format!("defining the metric family {name}"))?;
                Ok((opts, vec))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(GpuCollector {
            shared: Arc::new(Shared {
                templates,
                samples: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Replaces every sample with those of `snapshot`. `comm_of` names a pid; `role_of` gives
    /// the role it serves, if any.
    pub fn update(
        &self,
        snapshot: &GpuSnapshot,
        comm_of: &dyn Fn(u32) -> String,
        role_of: &dyn Fn(u32) -> Option<Role>,
    ) {
        let samples = render(snapshot, comm_of, role_of);
        *self.lock() = samples;
    }

    /// Drops every sample: after a failed read, no value is better than a stale one.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Sample>> {
        // The samples are replaced whole, so a panic elsewhere cannot leave them half-written.
        self.shared
            .samples
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for GpuCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuCollector")
            .field("samples", &self.lock().len())
            .finish()
    }
}

impl Collector for GpuCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.shared
            .templates
            .iter()
            .flat_map(|(_, vec)| vec.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let samples = self.lock().clone();
        let vecs: Vec<GaugeVec> = self
            .shared
            .templates
            .iter()
            .zip(FAMILIES)
            .filter_map(|((opts, _), (_, _, labels))| GaugeVec::new(opts.clone(), labels).ok())
            .collect();
        if vecs.len() != FAMILIES.len() {
            // Cannot happen: the same options were accepted in `new`.
            return Vec::new();
        }
        for sample in &samples {
            let labels: Vec<&str> = sample.labels.iter().map(String::as_str).collect();
            if let Ok(gauge) = vecs[sample.family as usize].get_metric_with_label_values(&labels) {
                gauge.set(sample.value);
            }
        }
        vecs.iter().flat_map(|vec| vec.collect()).collect()
    }
}

fn render(
    snapshot: &GpuSnapshot,
    comm_of: &dyn Fn(u32) -> String,
    role_of: &dyn Fn(u32) -> Option<Role>,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    for gpu in &snapshot.gpus {
        let index = gpu.index.to_string();
        let per_gpu = [
            (Family::MemoryUsed, gpu.memory_used_bytes.map(|b| b as f64)),
            (
                Family::MemoryTotal,
                gpu.memory_total_bytes.map(|b| b as f64),
            ),
            (Family::Utilization, gpu.utilization_ratio),
            (Family::MemoryUtilization, gpu.memory_utilization_ratio),
            (Family::Temperature, gpu.temperature_celsius),
            (Family::Power, gpu.power_watts),
        ];
        for (family, value) in per_gpu {
            if let Some(value) = value {
                samples.push(Sample {
                    family,
                    labels: vec![index.clone(), gpu.uuid.clone()],
                    value,
                });
            }
        }
        for process in &gpu.processes {
            let Some(memory) = process.memory_bytes else {
                continue;
            };
            let role = role_of(process.pid).map_or(NO_ROLE, Role::as_str);
            samples.push(Sample {
                family: Family::ProcessMemory,
                labels: vec![
                    index.clone(),
                    process.pid.to_string(),
                    comm_of(process.pid),
                    role.to_owned(),
                ],
                value: memory as f64,
            });
        }
        samples.push(Sample {
            family: Family::Info,
            labels: vec![
                index,
                gpu.uuid.clone(),
                gpu.name.clone(),
                snapshot.driver_version.clone(),
            ],
            value: 1.0,
        });
    }
    samples
}

#[cfg(test)]
mod tests {
    use prometheus::Registry;

    use super::*;
    use crate::gpu::fixtures::{comm_of, exported, lines, role_of, text, two_gpus};

    fn registered(prefix: &str) -> (GpuCollector, Registry) {
        let collector = GpuCollector::new(prefix).unwrap();
        let registry = Registry::new();
        registry.register(Box::new(collector.clone())).unwrap();
        (collector, registry)
    }

    #[test]
    fn every_family_has_exact_labels_and_values() {
        let (collector, registry) = registered("observer");
        collector.update(&two_gpus(), &comm_of, &role_of);
        assert_eq!(
            exported(&registry),
            lines(&[
                r#"observer_gpu_info{driver_version="550.54.15",gpu="0",name="NVIDIA H100 80GB HBM3",uuid="GPU-aaaa"} 1"#,
                r#"observer_gpu_info{driver_version="550.54.15",gpu="1",name="NVIDIA L4",uuid="GPU-bbbb"} 1"#,
                r#"observer_gpu_memory_total_bytes{gpu="0",uuid="GPU-aaaa"} 85520809984"#,
                r#"observer_gpu_memory_total_bytes{gpu="1",uuid="GPU-bbbb"} 24000000000"#,
                r#"observer_gpu_memory_used_bytes{gpu="0",uuid="GPU-aaaa"} 40000000000"#,
                r#"observer_gpu_memory_used_bytes{gpu="1",uuid="GPU-bbbb"} 0"#,
                r#"observer_gpu_memory_utilization_ratio{gpu="0",uuid="GPU-aaaa"} 0.12"#,
                r#"observer_gpu_memory_utilization_ratio{gpu="1",uuid="GPU-bbbb"} 0"#,
                // GPU 1 reports no power: its series is absent, GPU 0's stays.
                r#"observer_gpu_power_watts{gpu="0",uuid="GPU-aaaa"} 312.25"#,
                r#"observer_gpu_process_memory_bytes{comm="ollama",gpu="0",pid="4242",role="upstream"} 38000000000"#,
                r#"observer_gpu_process_memory_bytes{comm="python3",gpu="0",pid="777",role="other"} 1048576"#,
                r#"observer_gpu_temperature_celsius{gpu="0",uuid="GPU-aaaa"} 54"#,
                r#"observer_gpu_temperature_celsius{gpu="1",uuid="GPU-bbbb"} 31"#,
                r#"observer_gpu_utilization_ratio{gpu="0",uuid="GPU-aaaa"} 0.37"#,
                r#"observer_gpu_utilization_ratio{gpu="1",uuid="GPU-bbbb"} 0"#,
            ])
        );
    }

    #[test]
    fn every_family_is_a_gauge_with_help() {
        let (collector, registry) = registered("observer");
        collector.update(&two_gpus(), &comm_of, &role_of);
        let text = text(&registry);
        for (name, help, _) in FAMILIES {
            assert!(
                text.contains(&format!("# HELP observer_{name} {help}\n")),
                "{name} has no HELP"
            );
            assert!(text.contains(&format!("# TYPE observer_{name} gauge\n")));
        }
    }

    #[test]
    fn an_empty_prefix_leaves_bare_names() {
        let (collector, registry) = registered("");
        collector.update(&two_gpus(), &comm_of, &role_of);
        assert!(exported(&registry).contains(r#"gpu_power_watts{gpu="0",uuid="GPU-aaaa"} 312.25"#));
    }

    #[test]
    fn a_process_that_left_the_gpu_is_gone_at_the_next_update() {
        let (collector, registry) = registered("observer");
        collector.update(&two_gpus(), &comm_of, &role_of);
        let mut later = two_gpus();
        later.gpus[0].processes.retain(|p| p.pid != 777);
        later.gpus[0].power_watts = None;
        collector.update(&later, &comm_of, &role_of);
        let exported = exported(&registry);
        let process_lines: Vec<_> = exported
            .iter()
            .filter(|line| line.starts_with("observer_gpu_process_memory_bytes"))
            .collect();
        assert_eq!(
            process_lines,
            [
                r#"observer_gpu_process_memory_bytes{comm="ollama",gpu="0",pid="4242",role="upstream"} 38000000000"#
            ]
        );
        assert!(
            !exported
                .iter()
                .any(|line| line.starts_with("observer_gpu_power_watts")),
            "a value a GPU stopped giving is not kept"
        );
    }

    #[test]
    fn clear_removes_every_sample_and_family() {
        let (collector, registry) = registered("observer");
        collector.update(&two_gpus(), &comm_of, &role_of);
        collector.clear();
        assert_eq!(text(&registry), "");
        collector.update(&two_gpus(), &comm_of, &role_of);
        assert_eq!(exported(&registry).len(), 15);
    }

    #[test]
    fn nothing_is_exported_before_the_first_update() {
        let (_collector, registry) = registered("observer");
        assert_eq!(text(&registry), "");
    }

    #[test]
    fn an_invalid_prefix_is_refused() {
        assert!(GpuCollector::new("not a prefix").is_err());
    }
}
