//! NVIDIA GPUs through NVML, loaded at run time (`nvml-wrapper` dlopens the driver's library), and
//! the `gpu_*` metric families (docs/DESIGN.md#metrics-families,
//! docs/DESIGN.md#gpu-and-process-resources).
//!
//! A host without the NVIDIA driver is normal: every entry point here reports "unavailable"
//! with the reason instead of failing, and then no GPU series is exported at all.
//!
//! - [`reading`]: what one read of the GPUs returns; the [`GpuSource`] seam.
//! - [`nvml`]: [`NvmlSource`], the source over NVML.
//! - [`collector`]: [`GpuCollector`], the families rendered at scrape time.
//! - [`monitor`]: [`GpuMonitor`], start-up and the periodic read → update the daemon drives.

pub mod collector;
pub mod monitor;
pub mod nvml;
pub mod reading;

#[cfg(test)]
mod fixtures;

use std::ffi::OsStr;

use nvml_wrapper::Nvml;

pub use self::{
    collector::GpuCollector,
    monitor::{GpuMonitor, process_comm},
    nvml::NvmlSource,
    reading::{GpuProcess, GpuReading, GpuSnapshot, GpuSource},
};

/// Library names to try, most specific first: driver packages always ship the `.so.1`, the
/// unversioned name only comes with development files.
const LIBRARY_NAMES: &[&str] = &["libnvidia-ml.so.1", "libnvidia-ml.so"];

/// Whether NVML can be used here, and what it sees.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum GpuPresence {
    Available {
        driver_version: String,
        gpus: Vec<String>,
    },
    Unavailable {
        reason: String,
    },
}

/// Opens NVML, trying each library name; the first name's error (the driver's own library)
/// explains the failure.
pub fn open() -> Result<Nvml, String> {
    let mut first_error = None;
    for name in LIBRARY_NAMES {
        match Nvml::builder().lib_path(OsStr::new(name)).init() {
            Ok(nvml) => return Ok(nvml),
            Err(err) => {
                first_error.get_or_insert_with(|| format!("{name}: {err}"));
            }
        }
    }
    Err(format!(
        "no usable NVIDIA driver library ({})",
        first_error.unwrap_or_default()
    ))
}

/// Detects NVML and lists the GPUs by name.
pub fn detect() -> GpuPresence {
    let nvml = match open() {
        Ok(nvml) => nvml,
        Err(reason) => return GpuPresence::Unavailable { reason },
    };
    let source = NvmlSource::new(nvml);
    match source.gpu_names() {
        Ok(gpus) => GpuPresence::Available {
            driver_version: source.driver_version().to_owned(),
            gpus,
        },
        Err(reason) => GpuPresence::Unavailable { reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_open_says_which_library_is_missing() {
        match open() {
            Ok(_) => eprintln!("skipped: an NVIDIA driver is installed on this host"),
            Err(reason) => {
                assert!(
                    reason.starts_with("no usable NVIDIA driver library (libnvidia-ml.so.1: "),
                    "{reason}"
                );
                assert_eq!(detect(), GpuPresence::Unavailable { reason });
            }
        }
    }
}
