//! The simulator's configuration as a library value ([`SimConfig`]), and its construction from
//! the command line ([`SimArgs`](super::SimArgs)), including which flags switch a fault on.
//!
//! Ollama's own server settings (parallel slots, queue, context length, keep-alive, loaded
//! models) come from the `OLLAMA_*` variables as Ollama reads them ([`super::environment`]),
//! each overridden by its flag when given. Validation lives here so that a bad flag is one
//! clear error before anything listens.

use std::time::Duration;

use super::SimArgs;
use super::environment::{self, Lookup};
use super::faults::FaultRates;
use super::generation::Timing;
use super::request::Limits;

/// The Ollama release whose source the wire format was checked against.
pub const DEFAULT_OLLAMA_VERSION: &str = "0.32.15";

/// Models served when none are configured.
pub const DEFAULT_MODELS: &[&str] = &["llama3.2:1b", "qwen2.5:0.5b"];

/// Everything a simulated upstream needs. `Default` is the demo set-up: realistic delays, no
/// faults.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Model names, newest first in `/api/tags`.
    pub models: Vec<String>,
    pub timing: Timing,
    /// How long a model stays loaded after its last use (zero: unloaded after every request;
    /// `Duration::MAX`: forever). `OLLAMA_KEEP_ALIVE`.
    pub keep_alive: Duration,
    /// Generations a loaded model runs at once (`OLLAMA_NUM_PARALLEL`; 0 counts as 1).
    pub num_parallel: u32,
    /// Requests that may wait in the scheduler's queue for a model load before new ones get
    /// 503 (`OLLAMA_MAX_QUEUE`).
    pub max_queue: u32,
    /// Context length a model is loaded with unless a request sets `options.num_ctx`
    /// (`OLLAMA_CONTEXT_LENGTH`; 0 there means the VRAM-based default, 4096 here).
    pub context_length: u32,
    /// Models loaded at once; loading one more unloads the idle one expiring first
    /// (`OLLAMA_MAX_LOADED_MODELS`; 0 there means 3 per GPU, 3 here).
    pub max_loaded_models: u32,
    pub faults: FaultRates,
    pub limits: Limits,
    /// What `/api/version` reports.
    pub ollama_version: String,
    /// Whether a chat that offers tools gets a tool call (`--no-tool-calls`: never).
    pub tool_calls: bool,
    /// Seed of the fault dice and completion ids; `None` seeds from the clock.
    pub seed: Option<u64>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            models: DEFAULT_MODELS.iter().map(|m| (*m).to_owned()).collect(),
            timing: Timing::default(),
            keep_alive: environment::DEFAULT_KEEP_ALIVE,
            num_parallel: environment::DEFAULT_NUM_PARALLEL,
            max_queue: environment::DEFAULT_MAX_QUEUE,
            context_length: environment::DEFAULT_CONTEXT_LENGTH,
            max_loaded_models: environment::DEFAULT_MAX_LOADED_MODELS,
            faults: FaultRates::default(),
            limits: Limits::default(),
            ollama_version: DEFAULT_OLLAMA_VERSION.to_owned(),
            tool_calls: true,
            seed: None,
        }
    }
}

/// A flag value the simulator cannot use.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{flag} must be between 0 and 1, got {value}")]
    RateOutOfRange { flag: &'static str, value: f64 },
    #[error("--fault-status must be an error status (400-599), got {0}")]
    NotAnErrorStatus(u16),
    #[error("--model must name at least one model")]
    NoModels,
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
}

fn rate(flag: &'static str, value: Option<f64>, enabled: bool) -> Result<f64, ConfigError> {
    let value = value.unwrap_or(if enabled { 1.0 } else { 0.0 });
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::RateOutOfRange { flag, value })
    }
}

impl SimConfig {
    /// Reads the flags and this process's `OLLAMA_*` variables.
    pub fn from_args(sim: &SimArgs) -> Result<Self, ConfigError> {
        Self::from_args_and_env(sim, &environment::process_env)
    }

    /// Reads the flags, and for settings without a flag, the `OLLAMA_*` variables of `env`. A
    /// fault is switched on by any of its flags; its rate defaults to 1 (every inference
    /// request) once it is on.
    pub fn from_args_and_env(sim: &SimArgs, env: Lookup<'_>) -> Result<Self, ConfigError> {
        let (args, timing, limits) = (&sim.faults, &sim.timing, &sim.limits);
        let server = &sim.server;
        let defaults = FaultRates::default();
        let status = args.fault_status.unwrap_or(defaults.status);
        if !(400..=599).contains(&status) {
            return Err(ConfigError::NotAnErrorStatus(status));
        }
        let faults = FaultRates {
            status,
            status_rate: rate("--fault-rate", args.fault_rate, args.fault_status.is_some())?,
            reset_after: args.fault_reset_after.unwrap_or(0),
            reset_rate: rate(
                "--fault-reset-rate",
                args.fault_reset_rate,
                args.fault_reset_after.is_some(),
            )?,
            error_after: args.fault_error_after.unwrap_or(defaults.error_after),
            mid_stream_error_rate: rate(
                "--fault-mid-stream-error-rate",
                args.fault_mid_stream_error_rate,
                args.fault_error_after.is_some(),
            )?,
            slow_head: Duration::from_millis(args.slow_head.unwrap_or(0)),
            slow_head_rate: rate(
                "--slow-head-rate",
                args.slow_head_rate,
                args.slow_head.is_some(),
            )?,
            hang_rate: rate("--hang-rate", args.hang_rate, false)?,
        };
        let models = if sim.model.is_empty() {
            DEFAULT_MODELS.iter().map(|m| (*m).to_owned()).collect()
        } else {
            sim.model.clone()
        };
        if models.iter().all(|m| m.trim().is_empty()) {
            return Err(ConfigError::NoModels);
        }
        if limits.max_head_bytes == 0 {
            return Err(ConfigError::Zero("--max-head-bytes"));
        }
        Ok(Self {
            models,
            timing: Timing {
                load: Duration::from_millis(timing.load_ms),
                first_token: Duration::from_millis(timing.first_token_ms),
                token_interval: Duration::from_millis(timing.token_ms),
                tokens_per_reply: timing.tokens,
            },
            keep_alive: timing
                .keep_alive_secs
                .map_or_else(|| environment::keep_alive(env), Duration::from_secs),
            num_parallel: server.num_parallel.unwrap_or_else(|| {
                environment::uint(
                    env,
                    "OLLAMA_NUM_PARALLEL",
                    environment::DEFAULT_NUM_PARALLEL,
                )
            }),
            max_queue: server.max_queue.unwrap_or_else(|| {
                environment::uint(env, "OLLAMA_MAX_QUEUE", environment::DEFAULT_MAX_QUEUE)
            }),
            context_length: match server
                .context_length
                .unwrap_or_else(|| environment::uint(env, "OLLAMA_CONTEXT_LENGTH", 0))
            {
                0 => environment::DEFAULT_CONTEXT_LENGTH,
                n => n,
            },
            max_loaded_models: match server
                .max_loaded_models
                .unwrap_or_else(|| environment::uint(env, "OLLAMA_MAX_LOADED_MODELS", 0))
            {
                0 => environment::DEFAULT_MAX_LOADED_MODELS,
                n => n,
            },
            faults,
            limits: Limits {
                max_head_bytes: limits.max_head_bytes,
                max_body_bytes: limits.max_body_bytes,
            },
            ollama_version: sim.ollama_version.clone(),
            tool_calls: !sim.no_tool_calls,
            seed: args.seed,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    fn config_in(flags: &[&str], env: &[(&str, &str)]) -> Result<SimConfig, ConfigError> {
        let cli = Cli::try_parse_from(std::iter::once("sim").chain(flags.iter().copied())).unwrap();
        let lookup = |key: &str| {
            env.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v).to_owned())
        };
        SimConfig::from_args_and_env(&cli.sim, &lookup)
    }

    fn config(flags: &[&str]) -> Result<SimConfig, ConfigError> {
        config_in(flags, &[])
    }

    #[test]
    fn ollama_variables_set_the_server_and_flags_override_them() {
        let env = [
            ("OLLAMA_NUM_PARALLEL", "4"),
            ("OLLAMA_MAX_QUEUE", "2"),
            ("OLLAMA_CONTEXT_LENGTH", "8192"),
            ("OLLAMA_KEEP_ALIVE", "10m"),
            ("OLLAMA_MAX_LOADED_MODELS", "1"),
        ];
        let c = config_in(&[], &env).unwrap();
        assert_eq!(
            (
                c.num_parallel,
                c.max_queue,
                c.context_length,
                c.max_loaded_models
            ),
            (4, 2, 8192, 1)
        );
        assert_eq!(c.keep_alive, Duration::from_secs(600));
        let flags = [
            "--num-parallel",
            "2",
            "--max-queue",
            "0",
            "--context-length",
            "2048",
            "--keep-alive-secs",
            "5",
            "--max-loaded-models",
            "2",
        ];
        let c = config_in(&flags, &env).unwrap();
        assert_eq!(
            (
                c.num_parallel,
                c.max_queue,
                c.context_length,
                c.max_loaded_models
            ),
            (2, 0, 2048, 2)
        );
        assert_eq!(c.keep_alive, Duration::from_secs(5));
        // Ollama's zero means "choose": a VRAM-based context, 3 models per GPU.
        let zero = [
            ("OLLAMA_CONTEXT_LENGTH", "0"),
            ("OLLAMA_MAX_LOADED_MODELS", "0"),
        ];
        let c = config_in(&[], &zero).unwrap();
        assert_eq!((c.context_length, c.max_loaded_models), (4096, 3));
    }

    #[test]
    fn no_flags_is_the_default_demo_config() {
        assert_eq!(config(&[]).unwrap(), SimConfig::default());
    }

    #[test]
    fn a_fault_flag_switches_its_fault_on_for_every_request() {
        let c = config(&["--fault-status", "503"]).unwrap();
        assert_eq!((c.faults.status, c.faults.status_rate), (503, 1.0));
        let c = config(&["--fault-rate", "0.1"]).unwrap();
        assert_eq!((c.faults.status, c.faults.status_rate), (500, 0.1));
        let c = config(&["--fault-reset-after", "3"]).unwrap();
        assert_eq!((c.faults.reset_after, c.faults.reset_rate), (3, 1.0));
        let c = config(&["--slow-head", "250", "--slow-head-rate", "0.5"]).unwrap();
        assert_eq!(
            (c.faults.slow_head, c.faults.slow_head_rate),
            (Duration::from_millis(250), 0.5)
        );
        let c = config(&["--fault-mid-stream-error-rate", "0.2"]).unwrap();
        assert_eq!(
            (c.faults.error_after, c.faults.mid_stream_error_rate),
            (2, 0.2)
        );
    }

    #[test]
    fn bad_values_are_errors() {
        assert_eq!(
            config(&["--hang-rate", "2"]),
            Err(ConfigError::RateOutOfRange {
                flag: "--hang-rate",
                value: 2.0
            })
        );
        assert_eq!(
            config(&["--fault-status", "200"]),
            Err(ConfigError::NotAnErrorStatus(200))
        );
    }
}
