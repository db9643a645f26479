//! Fixed GPU readings and a fake [`GpuSource`] for the unit tests of this module, and a way to
//! read back what a registry would export.

use std::{collections::BTreeSet, collections::VecDeque};

use prometheus::{Encoder as _, Registry, TextEncoder};

use super::reading::{GpuProcess, GpuReading, GpuSnapshot, GpuSource};
use crate::base::Role;

/// Two GPUs: GPU 0 reports everything and runs Ollama's runner (pid 4242) and a stray
/// process (pid 777, listed twice); GPU 1 reports no power and has one process whose memory
/// the driver does not account.
pub fn two_gpus() -> GpuSnapshot {
    GpuSnapshot {
        driver_version: "550.54.15".into(),
        gpus: vec![
            GpuReading {
                index: 0,
                uuid: "GPU-aaaa".into(),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_used_bytes: Some(40_000_000_000),
                memory_total_bytes: Some(85_520_809_984),
                utilization_ratio: Some(0.37),
                memory_utilization_ratio: Some(0.12),
                temperature_celsius: Some(54.0),
                power_watts: Some(312.25),
                processes: vec![
                    GpuProcess {
                        pid: 777,
                        memory_bytes: Some(1_048_576),
                    },
                    GpuProcess {
                        pid: 4242,
                        memory_bytes: Some(38_000_000_000),
                    },
                ],
            },
            GpuReading {
                index: 1,
                uuid: "GPU-bbbb".into(),
                name: "NVIDIA L4".into(),
                memory_used_bytes: Some(0),
                memory_total_bytes: Some(24_000_000_000),
                utilization_ratio: Some(0.0),
                memory_utilization_ratio: Some(0.0),
                temperature_celsius: Some(31.0),
                power_watts: None,
                processes: vec![GpuProcess {
                    pid: 9,
                    memory_bytes: None,
                }],
            },
        ],
    }
}

pub fn comm_of(pid: u32) -> String {
    match pid {
        4242 => "ollama".into(),
        777 => "python3".into(),
        _ => String::new(),
    }
}

pub fn role_of(pid: u32) -> Option<Role> {
    (pid == 4242).then_some(Role::Upstream)
}

/// Gives the queued readings in order, then fails.
pub struct FakeSource(pub VecDeque<Result<GpuSnapshot, String>>);

impl GpuSource for FakeSource {
    fn read(&mut self) -> Result<GpuSnapshot, String> {
        self.0
            .pop_front()
            .unwrap_or_else(|| Err("no more readings".into()))
    }
}

/// Every sample line the registry exports, without comments.
pub fn exported(registry: &Registry) -> BTreeSet<String> {
    text(registry)
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// The registry in the text format.
pub fn text(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .unwrap();
    String::from_utf8(out).unwrap()
}

/// Lines as a set, for exact comparisons.
pub fn lines(lines: &[&str]) -> BTreeSet<String> {
    lines.iter().map(|line| (*line).to_owned()).collect()
}
