//! `observer metrics-reference`: every metric family the daemon can export, read from the code
//! that registers them (the same constructors `observer run` and `observer proxy` call), as a
//! Markdown table for docs/METRICS.md or as a `NAME TYPE` list for checking dashboards and
//! alert rules against.
//!
//! Owns nothing at run time; it builds a throw-away registry and describes it.

use std::{io::Write as _, process::ExitCode};

use anyhow::Context as _;

use crate::{
    gpu::collector::GpuCollector,
    metrics::{Metrics, MetricsConfig, schema::FamilySchema},
    probe::metrics::ProbeMetrics,
    procfs::TargetProcesses,
};

#[derive(Debug, clap::Args)]
pub struct ReferenceArgs {
    /// Print `NAME TYPE` lines instead of the Markdown table.
    #[arg(long)]
    pub list: bool,
}

/// Every family with the default prefix, by name: the core families, the probe's (as with a
/// `--model`), the watched processes' and the GPU's (present only where NVML works), and the
/// daemon's own `process_*`.
pub fn families() -> anyhow::Result<Vec<FamilySchema>> {
    let metrics = Metrics::new(MetricsConfig::default())?;
    ProbeMetrics::register(&metrics, &["MODEL".to_owned()])?;
    metrics.register(Box::new(TargetProcesses::new(metrics.prefix())?))?;
    metrics.register(Box::new(GpuCollector::new(metrics.prefix())?))?;
    Ok(metrics.schema())
}

/// The Markdown table docs/METRICS.md embeds between its generated-section markers.
pub fn markdown(families: &[FamilySchema]) -> String {
    let mut out = String::from("| family | type | labels | help |\n|---|---|---|---|\n");
    for family in families {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            family.name,
            family.kind,
            family.labels.join(", "),
            family.help.replace('|', "\\|"),
        ));
    }
    out
}

pub fn main(args: &ReferenceArgs) -> anyhow::Result<ExitCode> {
    let families = families()?;
    let text = if args.list {
        families
            .iter()
            .map(|family| format!("{} {}\n", family.name, family.kind))
            .collect()
    } else {
        markdown(&families)
    };
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("writing to stdout")?;
    Ok(ExitCode::SUCCESS)
}
