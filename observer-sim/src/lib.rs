//! # observer-sim
//!
//! `observer sim`: a simulated Ollama upstream that speaks Ollama's real wire format, with
//! configurable model load, time-to-first-token and per-token delays, and injected faults.
//! It owns its HTTP/1.1 server (tokio + `httparse`) so the bytes on the wire are exactly
//! those Ollama's Go server (net/http + gin) would write; it is used by `observer demo` and by
//! the tests of the whole project, and never by the observer's own data path. It is a crate of
//! its own, with no dependency on the daemon's library: the `observer` binary runs it as its
//! `sim` subcommand, and the daemon (`observer run`) does not link a line of it.
//!
//! # Routes
//!
//! `GET|HEAD /`, `GET|HEAD /api/version`, `GET|HEAD /api/tags`, `GET /api/ps`,
//! `POST /api/generate`, `POST /api/chat`, `POST /api/embed`, `POST /api/embeddings`,
//! `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/embeddings`,
//! `POST /v1/responses`, `POST /v1/messages` (Anthropic), `GET /v1/models`.
//! Other methods on these paths get gin's 405 (with `Allow`), other paths gin's 404.
//!
//! # Faults
//!
//! Configured rates (`--fault-rate`, `--hang-rate`, …) apply to inference routes only. A
//! request forces its own faults, for any route, with the header `X-Sim-Fault`: a comma-
//! separated list of items (when the header is present, no rates are rolled for it):
//!
//! | item | effect |
//! |---|---|
//! | `status=CODE` | answer CODE (400–599) with Ollama's error body for it |
//! | `reset-after=N` | send N streamed chunks, then reset the connection (SO_LINGER 0, close) when the next would go out; a shorter stream resets before its last chunk; a non-streamed response resets instead of being sent |
//! | `error-after=N` | after N content chunks send Ollama's mid-stream `{"error":…}` line instead of the next one (N=0: a 500 before any content; non-streamed: a 500; OpenAI stream: an empty model-less chunk and the end, as Ollama's middleware does) |
//! | `hang` | read the request, never answer |
//! | `slow-head-ms=MS` | dribble the response head a line at a time over MS |
//! | `load-ms=MS`, `first-token-ms=MS`, `token-ms=MS`, `tokens=N` | this request's timing |
//! | `think=N` | N thinking tokens before the answer, whatever the model and `think` |
//! | `tool-calls=N` | N tool calls instead of the answer (the request's tools in turn, else `sim_tool`) |
//! | `none` | no fault (and no rolled fault) |
//!
//! Example: `X-Sim-Fault: first-token-ms=4000` or `X-Sim-Fault: reset-after=3, slow-head-ms=200`.
//! A malformed header is answered 400 with `{"error": "..."}`.
//!
//! A running simulator can be stalled as a whole ([`SimControl`]; SIGUSR1 for `observer sim`,
//! SIGUSR2 resumes): inference requests are then read and never answered, whatever their
//! header; listing routes keep answering, as when Ollama's runner hangs but its API does not.
//!
//! # Timing and metrics
//!
//! A model's first use (and first use after `--keep-alive-secs`) waits `--load-ms`; then the
//! prompt takes `--first-token-ms`; tokens follow every `--token-ms`, `--tokens` of them, capped
//! by `options.num_predict` / `max_tokens` (`done_reason` `length`). The final message reports
//! the measured durations; `prompt_eval_count` is Σ over prompt texts of 4 + ⌈bytes/4⌉, after
//! the prompt is fitted to the context (below).
//!
//! # Thinking and tool calls
//!
//! Models named like Ollama's thinking models (`qwen3*`, `deepseek-r1*`, `gpt-oss*`,
//! `magistral*`, `phi4-reasoning*`) think unless a request says `"think": false`; `"think":
//! true` on another model is Ollama's 400 `"NAME" does not support thinking` (OpenAI:
//! `reasoning_effort` / `reasoning.effort`, `none` being false). A thinking reply first streams
//! ⌈tokens/2⌉ thinking tokens (`message.thinking`, generate's `thinking`, OpenAI's
//! `reasoning`). A chat request with `tools` whose last message is not a `tool` result gets one
//! tool call (never with `--no-tool-calls`; each call is 12 tokens of `eval_count`) instead of
//! an answer: one line with
//! `message.tool_calls` (`call_` ids, each required parameter set to a value of its type),
//! `done_reason` `stop` (OpenAI: a `tool_calls` delta, `finish_reason` `tool_calls`; the
//! Responses API: `function_call` items; Anthropic: `tool_use` blocks, `stop_reason`
//! `tool_use`).
//!
//! Embeddings (`/api/embed`, `/api/embeddings`, `/v1/embeddings`) count ⌈bytes/4⌉ tokens per
//! input, take `--first-token-ms` per input holding a slot, and return unit vectors of the
//! model's embedding length derived from the text.
//!
//! # Capacity, as Ollama's scheduler and runner have it
//!
//! Server settings come from Ollama's variables, read as Ollama reads them, each overridden by
//! its flag: `OLLAMA_NUM_PARALLEL` (`--num-parallel`, default 1), `OLLAMA_MAX_QUEUE`
//! (`--max-queue`, 512), `OLLAMA_CONTEXT_LENGTH` (`--context-length`; 0 or unset: 4096),
//! `OLLAMA_MAX_LOADED_MODELS` (`--max-loaded-models`; 0 or unset: 3), `OLLAMA_KEEP_ALIVE`
//! (`--keep-alive-secs`; Go durations or seconds, negative: forever, default 5m).
//!
//! - A request for a model that is not loaded (or loaded with another context) waits in the
//!   scheduler's queue while loads go on one at a time; when the queue already holds
//!   MAX_QUEUE requests it gets 503 `server busy, please try again.  maximum pending requests
//!   exceeded` at once (`/v1/*`: in the OpenAI error shape). Requests for a loaded model skip
//!   the queue. The wait and the load are `load_duration`.
//! - A loaded model runs NUM_PARALLEL generations at once; others wait, in order, for a slot.
//!   The wait shows in `total_duration` only: total = load + slot wait + prompt eval + eval.
//!   A client that disconnects (while waiting or streaming) frees its slot at once.
//! - A model's context is the request's `options.num_ctx` (native and embed routes), else the
//!   server's; `/api/ps` shows it. A prompt over it is cut as Ollama does (oldest messages dropped, system messages and
//!   the last one kept; then the runner keeps `num_keep`+1 tokens and half of the rest), or,
//!   with `"truncate": false` on `/api/chat` or `/api/generate`, answered 400 with
//!   llama-server's refusal as the message (`"shift": false`: Ollama's own 400).
//!
//! [`SimControl::timelines`] has each generation's phases (load, slot wait, prompt eval, eval;
//! not embeddings, not refused requests) for tests; nothing of it goes on the wire.
//!
//! # Layout
//!
//! - `config`: [`SimConfig`] and the flags. `server`: listener and connection loop.
//! - `request`, `chunked`, `response`: HTTP/1.x framing as Go does it. `routes`: gin's routing.
//! - `ollama`, `openai`, `completions`, `responses`, `anthropic`: the inference APIs;
//!   `embed`: embeddings; `inference_request`: the inference request bodies; `listing`: tags,
//!   ps, version, models. `generation`, `models`: what the "model" does.
//! - `faults`: fault decisions. `gojson`: Go's JSON. `wallclock`: Go's time formats (RFC 3339
//!   with trimmed nanoseconds, HTTP dates) and Unix seconds.
//! - `environment`: Ollama's `OLLAMA_*` variables. `runner`: one request through the scheduler
//!   and a slot, with its timeline.

mod anthropic;
mod chunked;
mod completions;
mod config;
mod embed;
mod environment;
mod faults;
mod generation;
mod gojson;
mod inference_request;
mod listing;
mod models;
pub mod nginx;
mod ollama;
mod openai;
mod request;
mod response;
mod responses;
mod routes;
mod runner;
mod server;
mod wallclock;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

pub use chunked::{LAST_CHUNK, encode_chunk};
pub use config::{ConfigError, DEFAULT_MODELS, DEFAULT_OLLAMA_VERSION, SimConfig};
pub use faults::{Dice, FAULT_HEADER, FaultRates};
pub use generation::{TOOL_CALL_TOKENS, Timing, prompt_tokens, reply_text, thinking_reply};
pub use request::Limits;
pub use runner::RequestTimeline;
pub use server::{SimControl, SimServer, serve, serve_controlled, serve_with_shutdown, spawn};

/// Flags of `observer sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on (port 0 picks a free port; the ready line shows the real one).
    #[arg(long, default_value = "127.0.0.1:11434")]
    pub listen: String,
    /// A model to serve (repeatable). Default: llama3.2:1b and qwen2.5:0.5b.
    #[arg(long, value_name = "NAME")]
    pub model: Vec<String>,
    /// Version reported by /api/version.
    #[arg(long, value_name = "VERSION", default_value = DEFAULT_OLLAMA_VERSION)]
    pub ollama_version: String,
    /// Never answer with a tool call, even when the request offers tools (a model that does
    /// not use them; `X-Sim-Fault: tool-calls=N` still forces calls).
    #[arg(long)]
    pub no_tool_calls: bool,
    // Boxed so that the CLI's command enum stays small.
    #[command(flatten)]
    pub timing: Box<TimingArgs>,
    #[command(flatten)]
    pub server: Box<ServerArgs>,
    #[command(flatten)]
    pub faults: Box<FaultArgs>,
    #[command(flatten)]
    pub limits: Box<LimitArgs>,
}

/// Delays of the simulated model.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Timing")]
pub struct TimingArgs {
    /// Model load delay on first use, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 800)]
    pub load_ms: u64,
    /// Time from a loaded model to the first token (prompt evaluation), in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 150)]
    pub first_token_ms: u64,
    /// Delay between tokens, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 20)]
    pub token_ms: u64,
    /// Tokens per reply (a request's num_predict / max_tokens may cap it).
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub tokens: u32,
    /// Seconds a model stays loaded after its last use (0: unload after every request).
    /// Default: OLLAMA_KEEP_ALIVE as Ollama reads it, else 300.
    #[arg(long, value_name = "SECS")]
    pub keep_alive_secs: Option<u64>,
}

/// Ollama's server settings; each defaults to its `OLLAMA_*` variable, read as Ollama reads it.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Server (default: Ollama's environment variables)")]
pub struct ServerArgs {
    /// Generations one loaded model runs at once (OLLAMA_NUM_PARALLEL, default 1).
    #[arg(long, value_name = "N")]
    pub num_parallel: Option<u32>,
    /// Requests waiting for a model load before new ones get 503 (OLLAMA_MAX_QUEUE, default 512).
    #[arg(long, value_name = "N")]
    pub max_queue: Option<u32>,
    /// Context length models load with unless a request sets num_ctx (OLLAMA_CONTEXT_LENGTH;
    /// default 4096).
    #[arg(long, value_name = "TOKENS")]
    pub context_length: Option<u32>,
    /// Models loaded at once (OLLAMA_MAX_LOADED_MODELS; default 3).
    #[arg(long, value_name = "N")]
    pub max_loaded_models: Option<u32>,
}

/// Injected faults; rates apply to inference requests. Any flag of a fault turns it on.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Faults")]
pub struct FaultArgs {
    /// Status answered by the status fault (default 500).
    #[arg(long, value_name = "CODE")]
    pub fault_status: Option<u16>,
    /// Fraction of inference requests answered with the fault status.
    #[arg(long, value_name = "RATE")]
    pub fault_rate: Option<f64>,
    /// Reset streamed responses after N chunks.
    #[arg(long, value_name = "N")]
    pub fault_reset_after: Option<u32>,
    /// Fraction of inference requests reset (default 1 when --fault-reset-after is given).
    #[arg(long, value_name = "RATE")]
    pub fault_reset_rate: Option<f64>,
    /// Fraction of inference requests that end with a mid-stream error line.
    #[arg(long, value_name = "RATE")]
    pub fault_mid_stream_error_rate: Option<f64>,
    /// Content chunks before the mid-stream error (default 2).
    #[arg(long, value_name = "N")]
    pub fault_error_after: Option<u32>,
    /// Delay and dribble the response head over MS milliseconds.
    #[arg(long, value_name = "MS")]
    pub slow_head: Option<u64>,
    /// Fraction of inference requests with a slow head (default 1 when --slow-head is given).
    #[arg(long, value_name = "RATE")]
    pub slow_head_rate: Option<f64>,
    /// Fraction of inference requests accepted and never answered.
    #[arg(long, value_name = "RATE")]
    pub hang_rate: Option<f64>,
    /// Seed for fault rolls and completion ids (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Bounds on requests.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Limits")]
pub struct LimitArgs {
    /// Largest request head accepted (431 above).
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024)]
    pub max_head_bytes: usize,
    /// Largest request body accepted (413 above).
    #[arg(long, value_name = "BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
}

/// `observer sim`: binds, prints `observer sim listening on ADDR` on stdout when ready, serves
/// until SIGINT or SIGTERM. SIGUSR1 stalls inference routes (requests read, never answered),
/// SIGUSR2 resumes them.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let config = SimConfig::from_args(&args)?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let listener = TcpListener::bind(args.listen.as_str())
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    info!(%addr, models = ?config.models, "simulated Ollama upstream ready");
    {
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "observer sim listening on {addr}").context("cannot write to stdout")?;
        stdout.flush().context("cannot write to stdout")?;
    }
    let mut stall = signal(SignalKind::user_defined1()).context("cannot watch SIGUSR1")?;
    let mut resume = signal(SignalKind::user_defined2()).context("cannot watch SIGUSR2")?;
    let control = SimControl::default();
    let switch = control.clone();
    serve_controlled(listener, config, control, async move {
        loop {
            tokio::select! {
                _ = interrupt.recv() => break info!("SIGINT received"),
                _ = terminate.recv() => break info!("SIGTERM received"),
                _ = stall.recv() => {
                    switch.stall();
                    info!("SIGUSR1 received: stalling inference requests");
                }
                _ = resume.recv() => {
                    switch.resume();
                    info!("SIGUSR2 received: answering inference requests again");
                }
            }
        }
    })
    .await
}
