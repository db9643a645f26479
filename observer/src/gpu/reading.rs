//! What one read of the GPUs returns, and the [`GpuSource`] seam that gives it.
//!
//! Owns the shape of a reading and the rules that do not depend on NVML: a value a GPU cannot
//! give is `None` (its series is left out, the rest stay), percentages become ratios, and a
//! process listed as both compute and graphics is one process. Nothing here loads NVML or
//! names metrics.

use std::collections::BTreeMap;

/// Something that reads every GPU on the host: NVML in the daemon, fixed readings in tests.
pub trait GpuSource: Send {
    /// One reading of all GPUs. An error means nothing usable was read this time.
    fn read(&mut self) -> Result<GpuSnapshot, String>;
}

/// All GPUs at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuSnapshot {
    pub driver_version: String,
    pub gpus: Vec<GpuReading>,
}

/// One GPU at one moment. `None` is a value this GPU cannot give (e.g. power on some boards).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuReading {
    /// NVML's index, the `gpu` label.
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    /// Fraction of the last sample period during which a kernel ran, 0..1.
    pub utilization_ratio: Option<f64>,
    /// Fraction of the last sample period during which device memory was read or written, 0..1.
    pub memory_utilization_ratio: Option<f64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
    /// One entry per pid, sorted by pid.
    pub processes: Vec<GpuProcess>,
}

/// A process holding a context on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuProcess {
    pub pid: u32,
    /// `None` where the driver does not account memory per process.
    pub memory_bytes: Option<u64>,
}

/// NVML's utilization percent (0..100) as a ratio (0..1).
pub fn percent_to_ratio(percent: u32) -> f64 {
    f64::from(percent) / 100.0
}

/// NVML's power in milliwatts as watts.
pub fn milliwatts_to_watts(milliwatts: u32) -> f64 {
    f64::from(milliwatts) / 1000.0
}

/// One entry per pid out of the compute and graphics lists. A pid in both (a process with both
/// kinds of context) keeps the larger memory, since the driver reports the same allocation
/// through either list.
pub fn merge_processes(processes: impl IntoIterator<Item = GpuProcess>) -> Vec<GpuProcess> {
    let mut by_pid: BTreeMap<u32, Option<u64>> = BTreeMap::new();
    for process in processes {
        let memory = by_pid.entry(process.pid).or_insert(process.memory_bytes);
        // `None < Some(_)`, so a known amount wins over an unknown one.
        *memory = (*memory).max(process.memory_bytes);
    }
    by_pid
        .into_iter()
        .map(|(pid, memory_bytes)| GpuProcess { pid, memory_bytes })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(pid: u32, memory_bytes: Option<u64>) -> GpuProcess {
        GpuProcess { pid, memory_bytes }
    }

    #[test]
    fn a_pid_listed_twice_keeps_the_larger_memory() {
        let merged = merge_processes([
            process(300, Some(10)),
            process(100, Some(5)),
            process(300, Some(40)),
            process(200, None),
            process(200, Some(7)),
            process(100, None),
        ]);
        assert_eq!(
            merged,
            [
                process(100, Some(5)),
                process(200, Some(7)),
                process(300, Some(40))
            ]
        );
    }

    #[test]
    fn a_pid_without_memory_stays_listed() {
        assert_eq!(
            merge_processes([process(9, None), process(9, None)]),
            [process(9, None)]
        );
    }

    #[test]
    fn percent_and_milliwatts_become_base_units() {
        assert_eq!(percent_to_ratio(37), 0.37);
        assert_eq!(percent_to_ratio(100), 1.0);
        assert_eq!(percent_to_ratio(0), 0.0);
        assert_eq!(milliwatts_to_watts(71_500), 71.5);
    }
}
