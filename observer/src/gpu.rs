//! NVIDIA GPUs through NVML, loaded at run time (`nvml-wrapper` dlopens the driver's library).
//!
//! A host without the NVIDIA driver is normal: every entry point here reports "unavailable"
//! with the reason instead of failing. (The metrics collector builds on [`open`].)

use std::ffi::OsStr;

use nvml_wrapper::Nvml;

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
    let driver_version = nvml
        .sys_driver_version()
        .unwrap_or_else(|err| format!("unknown ({err})"));
    let count = match nvml.device_count() {
        Ok(count) => count,
        Err(err) => {
            return GpuPresence::Unavailable {
                reason: format!("NVML loaded but cannot count GPUs: {err}"),
            };
        }
    };
    let gpus = (0..count)
        .map(|i| match nvml.device_by_index(i).and_then(|d| d.name()) {
            Ok(name) => name,
            Err(err) => format!("GPU {i} (name unreadable: {err})"),
        })
        .collect();
    GpuPresence::Available {
        driver_version,
        gpus,
    }
}
