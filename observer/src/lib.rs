//! # observer
//!
//! An out-of-process traffic observer for LLM serving hosts: kernel programs watch the bytes
//! the gateway (`:18789`) and Ollama (`:11434`) send and receive; this daemon turns them into
//! HTTP exchanges and Prometheus metrics.
//!
//! # Layout
//!
//! - [`admin`]: the admin HTTP listener: `/metrics`, `/healthz`, `/readyz`, `/status`.
//! - [`cli`]: command line, logging set-up, dispatch to the subcommands.
//! - [`capture`]: load and attach the embedded kernel programs, read and decode the ring buffer.
//! - [`check`]: `observer check`, what this host supports and which mode will work.
//! - [`config_file`]: `--config FILE`, TOML settings under the flags and `OBSERVER_*` variables.
//! - [`collectors`]: process resources and GPUs, read on one thread beside the pipeline.
//! - [`demo`]: `observer demo`, simulator, gateway, observer and chat users with a live summary.
//! - [`engine`]: the HTTP exchange engine: per-connection bytes in, exchanges with LLM fields out.
//! - [`gpu`]: NVIDIA GPUs through NVML, loaded at run time; absent drivers are normal.
//! - [`metrics`]: one `Metrics` owning the Prometheus registry; exchanges in, exposition out.
//! - [`pipeline`]: capture events → engine → metrics and gateway correlation; counts each exchange once.
//! - [`probe`]: the model readiness probe (tcp, api, generate stages), `observer probe`.
//! - [`procfs`]: CPU, memory, fds and threads of the processes that own the watched listeners.
//! - [`proxy`]: `observer proxy`, the forwarder that feeds the same pipeline where eBPF is missing.
//! - [`reference`]: `observer metrics-reference`, every exported family as read from the code.
//! - [`server_settings`]: Ollama's capacity settings, read from its environment.
//! - [`run`]: `observer run`, the daemon: capture, pipeline and admin server wired together.
//! - [`sim`]: `observer sim`, a simulated Ollama upstream speaking Ollama's real wire format.
//! - [`trace`]: `observer trace`, the capture's events as JSON lines, for debugging the kernel side.
//! - [`wallclock`]: instants as text (RFC 3339, HTTP dates), one calendar conversion.
//! - [`tracefs`]: find or mount tracefs and list tracepoints.

pub mod admin;
pub mod base;
pub mod capture;
pub mod check;
pub mod collectors;
pub mod daemon;
pub mod engine;
pub mod gpu;
pub mod metrics;
pub mod pipeline;
pub mod probe;
pub mod procfs;
pub mod proxy;
pub mod reference;
pub mod run;
pub mod server_settings;
pub mod trace;
