//! `observer check` (being written).
use std::process::ExitCode;
#[derive(Debug, clap::Args)]
pub struct CheckArgs {}
pub async fn run(_args: CheckArgs) -> anyhow::Result<ExitCode> {
    Ok(ExitCode::FAILURE)
}
