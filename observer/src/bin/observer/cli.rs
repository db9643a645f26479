//! Command line: the subcommands, global logging flags, and the one place that turns an error
//! into a one-line message and an exit code.
//!
//! Every subcommand's flags live beside the code that uses them (`check::CheckArgs`,
//! `sim::SimArgs`, ...); this module only assembles them. Settings come from flags, then
//! `OBSERVER_*` variables, then the `--config` file ([`config_file`]), then the defaults; a
//! mistake in any of them is exit code 2 before anything starts.

use std::{ffi::OsString, io::IsTerminal as _, path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::config_file::{self, ConfigError, ConfigFile, ParseError};
use crate::demo;
use observer::{check, probe, proxy, reference, run, trace};

#[derive(Debug, Parser)]
#[command(
    name = "observer",
    version,
    about = "eBPF traffic observer for LLM serving hosts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "OBSERVER_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter: a level (`info`, `debug`) or a tracing directive (`observer=debug`).
    #[arg(long, global = true, default_value = "info", env = "OBSERVER_LOG")]
    pub log: String,
    /// A TOML file of settings: keys are long flag names (`metrics-addr = "127.0.0.1:9464"`),
    /// top level or in a `[run]`, `[proxy]`, ... table; flags and OBSERVER_* variables win.
    #[arg(long, global = true, value_name = "FILE", env = "OBSERVER_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Why the process stops before starting anything: exit code 2 (0 for `--help`, `--version`).
#[derive(Debug)]
pub enum UsageError {
    /// A bad flag, environment variable, `--help` or `--version`, as clap tells it.
    Clap(clap::Error),
    /// The config file cannot be read, parsed or used.
    Config(ConfigError),
    /// Settings that parsed but do not fit together.
    Settings(anyhow::Error),
}

impl From<ParseError> for UsageError {
    fn from(err: ParseError) -> Self {
        match err {
            ParseError::Clap(err) => UsageError::Clap(err),
            ParseError::Config(err) => UsageError::Config(err),
        }
    }
}

impl Cli {
    /// Parses `argv` (program name first), completed by the `--config` file, and checks the
    /// settings that can be checked before anything starts.
    pub fn parse_args(argv: Vec<OsString>) -> Result<Cli, UsageError> {
        let matches = config_file::get_matches(Cli::command(), argv, ConfigFile::read)?;
        let cli = Cli::from_arg_matches(&matches).map_err(UsageError::Clap)?;
        cli.validate().map_err(UsageError::Settings)?;
        Ok(cli)
    }

    /// Settings whose every value parsed but which do not fit together (a port watched twice,
    /// a ring buffer that is no power of two): each command's own `validate`.
    fn validate(&self) -> anyhow::Result<()> {
        match &self.command {
            Command::Check(args) => args.validate(),
            Command::Run(args) => args.validate(),
            Command::Proxy(args) => args.validate(),
            Command::Probe(args) => args.validate(),
            Command::Trace(args) => args.validate(),
            Command::Demo(_) | Command::Sim(_) | Command::MetricsReference(_) => Ok(()),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Report what this host supports and which mode will work (exit 0 when eBPF mode can run).
    Check(check::CheckArgs),
    /// Run the whole product on this machine: simulated Ollama, a gateway, the observer and chat users, with a live summary.
    Demo(demo::DemoArgs),
    /// Run a simulated Ollama upstream (real wire format, configurable timing and faults).
    Sim(observer_sim::SimArgs),
    /// Run the daemon: kernel capture → HTTP exchanges → Prometheus metrics on the admin server (root).
    Run(Box<run::RunArgs>),
    /// Forward the gateway's traffic to Ollama and serve the same metrics without eBPF.
    Proxy(Box<proxy::ProxyArgs>),
    /// Check once whether the upstream's models can answer (exit 0 ready, 1 not ready, 3 unreachable).
    Probe(probe::ProbeArgs),
    /// Print the kernel capture's events (or, with --exchanges, HTTP exchanges) as JSON lines until interrupted (root).
    Trace(trace::TraceArgs),
    /// Print every metric family the daemon can export (name, type, labels, help).
    MetricsReference(reference::ReferenceArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Parses the command line and runs the subcommand. Errors come out as one line on stderr.
pub fn main() -> ExitCode {
    let cli = match Cli::parse_args(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(UsageError::Clap(err)) => return usage_error(err),
        Err(UsageError::Config(err)) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
        Err(UsageError::Settings(err)) => {
            eprintln!("error: {err:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(err) = init_logging(cli.log_format, &cli.log) {
        eprintln!("error: {err:#}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Check(args) => check::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Sim(args) => observer_sim::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Run(args) => run::run(*args).await,
            Command::Trace(args) => trace::run(args).await,
            Command::Probe(args) => probe::run(args).await,
            Command::Proxy(args) => proxy::run(*args).await,
            Command::MetricsReference(args) => reference::main(&args),
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version go to stdout as clap renders them; a usage mistake becomes one line.
fn usage_error(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            ExitCode::from(if err.use_stderr() { 2 } else { 0 })
        }
        _ => {
            let rendered = err.render().to_string();
            let first = rendered
                .lines()
                .next()
                .unwrap_or("error: invalid command line");
            eprintln!("{first} (see 'observer --help')");
            ExitCode::from(2)
        }
    }
}

fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)
        .map_err(|err| anyhow::anyhow!("invalid --log filter {filter:?}: {err}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never in files or journald.
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|err| anyhow::anyhow!("cannot install the logger: {err}"))
}
