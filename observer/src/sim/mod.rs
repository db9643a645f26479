//! `observer sim`: a simulated Ollama upstream. (Being written.)

use std::net::SocketAddr;

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:11434")]
    pub listen: SocketAddr,
}

pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "observer sim is not built yet (asked to listen on {})",
        args.listen
    )
}
