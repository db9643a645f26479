//! # observer
//!
//! An out-of-process traffic observer for LLM serving hosts: kernel programs watch the bytes
//! the gateway (`:18789`) and Ollama (`:11434`) send and receive; this daemon turns them into
//! HTTP exchanges and Prometheus metrics.
//!
//! # Layout
//!
//! A house of layers, bottom first. A module uses its own items and those of the layers below
//! it, never one above or beside it (`cargo xtask layers` checks every `crate::` path). Data
//! flows up: the capture (or the proxy) hands connections and bytes to the pipeline, which runs
//! them through the engine into metrics, which the admin server serves.
//!
//! 0. [`base`]: the vocabulary every layer shares: roles, sides, directions, connection
//!    records, clocks.
//! 1. [`procfs`]: `/proc`: the processes owning watched listeners, their resources, and the
//!    socket tables of every network namespace.
//! 2. [`server_settings`]: Ollama's capacity settings, read from its environment.
//!    [`gpu`]: NVIDIA GPUs through NVML, loaded at run time; absent drivers are normal.
//!    [`engine`]: the HTTP exchange engine: per-connection bytes in, exchanges with LLM
//!    fields out.
//! 3. [`metrics`]: one `Metrics` owning the Prometheus registry; exchanges in, exposition out;
//!    the text format read back.
//! 4. [`pipeline`]: connections and bytes → engine → metrics and gateway correlation; counts
//!    each exchange once. Knows nothing of eBPF.
//! 5. [`capture`]: the embedded kernel programs loaded and attached, the ring buffer read,
//!    decoded and handed to the pipeline, reconciled with the kernel's table.
//!    [`probe`]: the model readiness probe (tcp, api, generate stages), `observer probe`.
//!    [`collectors`]: process resources and GPUs, read on one thread beside the pipeline.
//! 6. [`admin`]: the admin HTTP listener: `/metrics`, `/healthz`, `/readyz`, `/status`.
//! 7. [`daemon`]: the start-up and shut-down `run`, `proxy` and `trace` share.
//! 8. The commands: [`run`] (`observer run`, the daemon), [`proxy`] (`observer proxy`, the
//!    forwarder that feeds the same pipeline where eBPF is missing), [`trace`] (the capture's
//!    events as JSON lines), [`check`] (what this host supports), [`reference`](mod@reference) (every
//!    exported family, as read from the code).
//!
//! The command line, the config file and `observer demo` are the binary's
//! (`src/bin/observer/`); `observer sim` is the `observer-sim` crate's, which this library
//! never uses.

pub mod base;

pub mod procfs;

pub mod engine;
pub mod gpu;
pub mod server_settings;

pub mod metrics;

pub mod pipeline;

pub mod capture;
pub mod collectors;
pub mod probe;

pub mod admin;

pub mod daemon;

pub mod check;
pub mod proxy;
pub mod reference;
pub mod run;
pub mod trace;
