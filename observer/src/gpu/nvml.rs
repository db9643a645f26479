//! [`NvmlSource`]: the [`GpuSource`] over a loaded NVML library.
//!
//! Owns the NVML calls and their error policy: a value one GPU does not support is `None`; a
//! GPU that cannot be opened at all is left out of the reading (with a warning when it first
//! goes, and a note when it is back) so the other GPUs keep their series; the read as a whole
//! fails only when no GPU can be counted or none can be read. It does not name metrics.

use std::collections::BTreeSet;

use nvml_wrapper::{
    Device, Nvml, enum_wrappers::device::TemperatureSensor, enums::device::UsedGpuMemory,
    error::NvmlError, struct_wrappers::device::ProcessInfo,
};

use super::reading::{
    GpuProcess, GpuReading, GpuSnapshot, GpuSource, merge_processes, milliwatts_to_watts,
    percent_to_ratio,
};

/// Reads every GPU NVML sees, each time it is asked.
pub struct NvmlSource {
    nvml: Nvml,
    /// Read once: a different driver needs the module reloaded, which ends this NVML session.
    driver_version: String,
    /// GPUs whose last read failed, so that a lasting failure is reported once.
    unreadable: BTreeSet<u32>,
}

impl NvmlSource {
    pub fn new(nvml: Nvml) -> NvmlSource {
        let driver_version = nvml
            .sys_driver_version()
            .unwrap_or_else(|err| format!("unknown ({err})"));
        NvmlSource {
            nvml,
            driver_version,
            unreadable: BTreeSet::new(),
        }
    }

    pub fn driver_version(&self) -> &str {
        &self.driver_version
    }

    /// How many GPUs NVML sees.
    pub fn gpu_count(&self) -> Result<u32, String> {
        self.nvml
            .device_count()
            .map_err(|err| format!("NVML cannot count GPUs: {err}"))
    }

    /// Each GPU's name, or why it cannot be read, in index order.
    pub fn gpu_names(&self) -> Result<Vec<String>, String> {
        Ok((0..self.gpu_count()?)
            .map(
                |i| match self.nvml.device_by_index(i).and_then(|d| d.name()) {
                    Ok(name) => name,
                    Err(err) => format!("GPU {i} (name unreadable: {err})"),
                },
            )
            .collect())
    }

    fn read_gpu(&self, index: u32) -> Result<GpuReading, NvmlError> {
        let device = self.nvml.device_by_index(index)?;
        let uuid = device.uuid()?;
        let name = optional(index, "name", device.name()).unwrap_or_else(|| "unknown".into());
        let memory = optional(index, "memory", device.memory_info());
        let utilization = optional(index, "utilization", device.utilization_rates());
        let temperature = optional(
            index,
            "temperature",
            device.temperature(TemperatureSensor::Gpu),
        );
        let power = optional(index, "power", device.power_usage());
        Ok(GpuReading {
            index,
            uuid,
            name,
            memory_used_bytes: memory.as_ref().map(|m| m.used),
            memory_total_bytes: memory.as_ref().map(|m| m.total),
            utilization_ratio: utilization.as_ref().map(|u| percent_to_ratio(u.gpu)),
            memory_utilization_ratio: utilization.as_ref().map(|u| percent_to_ratio(u.memory)),
            temperature_celsius: temperature.map(f64::from),
            power_watts: power.map(milliwatts_to_watts),
            processes: processes(index, &device),
        })
    }
}

impl GpuSource for NvmlSource {
    fn read(&mut self) -> Result<GpuSnapshot, String> {
        let count = self.gpu_count()?;
        let mut gpus = Vec::with_capacity(count as usize);
        let mut first_error = None;
        for index in 0..count {
            match self.read_gpu(index) {
                Ok(reading) => {
                    if self.unreadable.remove(&index) {
                        tracing::info!(gpu = index, "GPU {index} is readable again");
                    }
                    gpus.push(reading);
                }
                Err(err) => {
                    if self.unreadable.insert(index) {
                        tracing::warn!(
                            gpu = index,
                            "GPU {index} cannot be read, its metrics are left out: {err}"
                        );
                    }
                    first_error.get_or_insert_with(|| format!("GPU {index}: {err}"));
                }
            }
        }
        if let (true, Some(err)) = (gpus.is_empty(), first_error) {
            return Err(format!("no GPU could be read ({err})"));
        }
        Ok(GpuSnapshot {
            driver_version: self.driver_version.clone(),
            gpus,
        })
    }
}

/// A value this GPU may not give: `NotSupported` is a normal answer; anything else is worth a
/// debug line but still only costs this one value.
fn optional<T>(index: u32, what: &str, result: Result<T, NvmlError>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(NvmlError::NotSupported) => None,
        Err(err) => {
            tracing::debug!(gpu = index, "reading the {what} of GPU {index}: {err}");
            None
        }
    }
}

/// Compute and graphics processes, one entry per pid.
fn processes(index: u32, device: &Device<'_>) -> Vec<GpuProcess> {
    let compute = optional(
        index,
        "compute processes",
        device.running_compute_processes(),
    );
    let graphics = optional(
        index,
        "graphics processes",
        device.running_graphics_processes(),
    );
    merge_processes(
        compute
            .into_iter()
            .chain(graphics)
            .flatten()
            .map(gpu_process),
    )
}

fn gpu_process(info: ProcessInfo) -> GpuProcess {
    GpuProcess {
        pid: info.pid,
        memory_bytes: match info.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => Some(bytes),
            UsedGpuMemory::Unavailable => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_memory_the_driver_does_not_account_is_unknown() {
        let info = |used_gpu_memory| ProcessInfo {
            pid: 42,
            used_gpu_memory,
            gpu_instance_id: None,
            compute_instance_id: None,
        };
        assert_eq!(
            gpu_process(info(UsedGpuMemory::Used(1 << 30))),
            GpuProcess {
                pid: 42,
                memory_bytes: Some(1 << 30)
            }
        );
        assert_eq!(
            gpu_process(info(UsedGpuMemory::Unavailable)),
            GpuProcess {
                pid: 42,
                memory_bytes: None
            }
        );
    }

    #[test]
    fn only_the_unsupported_value_is_lost() {
        assert_eq!(optional(0, "power", Ok(5)), Some(5));
        assert_eq!(
            optional::<u32>(0, "power", Err(NvmlError::NotSupported)),
            None
        );
        assert_eq!(optional::<u32>(0, "power", Err(NvmlError::GpuLost)), None);
    }
}
