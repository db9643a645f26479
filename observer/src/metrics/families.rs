//! The metric families of docs/DESIGN.md#metrics-families: names, HELP text, label names and
//! buckets, registered once on the [`Metrics`](super::Metrics) registry.
//!
//! Owns the schema only. What is observed into which family, and with which label values, is
//! decided in `mod.rs`; this file must not grow logic beyond declaring families.

use std::cell::RefCell;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, core::Collector,
};

use super::schema::{FamilySchema, describe};

/// Whole exchanges, streams included: up to 5 minutes.
pub const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0,
    300.0,
];
/// First byte and first chunk: 1 ms to 60 s (a cold model load sits at the top).
pub const FIRST_BYTE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];
/// Body sizes: 64 B to 64 MiB in steps of 4.
pub const SIZE_BUCKETS: &[f64] = &[
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];
/// Time between streamed chunks: 1 ms to 5 s.
pub const INTER_CHUNK_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// The OpenTelemetry GenAI conventions' bucket advice for `gen_ai.server.time_to_first_token`.
pub const GEN_AI_TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// … for `gen_ai.server.request.duration` and `gen_ai.client.operation.duration`.
pub const GEN_AI_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// … for `gen_ai.server.time_per_output_token`.
pub const GEN_AI_TPOT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
/// … for `gen_ai.client.token.usage`.
pub const GEN_AI_TOKEN_BUCKETS: &[f64] = &[
    1.0,
    4.0,
    16.0,
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];
/// Phases of a request in the model server (queue, load, prompt, generation): 1 ms to 5 min.
pub const PHASE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
/// Prompt processing speed: 10 to 100 000 tokens/s (prefill runs far faster than generation).
pub const PROMPT_TOKENS_PER_SECOND_BUCKETS: &[f64] = &[
    10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 25000.0, 50000.0,
    100_000.0,
];

/// The GenAI conventions' attributes as Prometheus labels, before a family's own.
pub const GEN_AI_LABELS: [&str; 3] = [
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
];

/// Time the gateway adds: 100 µs to 5 s.
pub const OVERHEAD_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The gateway's own time in a turn: 1 ms to 60 s (an agent's first turn after start spends
/// seconds before it calls the model).
pub const TURN_OVERHEAD_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// Every family the daemon exports besides `process_*`.
#[derive(Debug)]
pub struct Families {
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub http_first_byte: HistogramVec,
    pub http_request_size: HistogramVec,
    pub http_response_size: HistogramVec,
    pub http_in_flight: IntGaugeVec,
    pub http_parse_errors: IntCounterVec,
    pub tcp_active: IntGaugeVec,
    pub tcp_opened: IntCounterVec,
    pub tcp_closed: IntCounterVec,
    pub tcp_bytes: IntCounterVec,
    pub gateway_overhead: HistogramVec,
    pub gateway_first_byte_overhead: HistogramVec,
    pub gateway_unmatched: IntCounterVec,
    pub gen_ai_first_token: HistogramVec,
    pub gen_ai_duration: HistogramVec,
    pub gen_ai_tokens: HistogramVec,
    pub gen_ai_time_per_output_token: HistogramVec,
    pub llm_requests: IntCounterVec,
    pub llm_inter_chunk: HistogramVec,
    pub llm_phase: HistogramVec,
    pub llm_prompt_tokens_per_second: HistogramVec,
    pub llm_first_answer: HistogramVec,
    pub llm_tool_calls: IntCounterVec,
    pub llm_estimated_tokens: IntCounterVec,
    pub llm_rejected: IntCounterVec,
    pub llm_prompts_at_context: IntCounterVec,
    pub llm_wait_after_cancel: HistogramVec,
    pub llm_server_info: IntGaugeVec,
    pub llm_slots: IntGaugeVec,
    pub llm_waiting: IntGaugeVec,
    pub websocket_messages: IntCounterVec,
    pub websocket_unread: IntCounterVec,
    pub rpc_calls: IntCounterVec,
    pub rpc_duration: HistogramVec,
    pub rpc_first_delta: HistogramVec,
    pub rpc_tokens: IntCounterVec,
    pub rpc_gateway_overhead: HistogramVec,
    pub rpc_unpaired: IntCounterVec,
    pub ebpf_events: IntCounterVec,
    pub ebpf_lost: IntCounterVec,
    pub build_info: IntGaugeVec,
}

/// Builds families under one name prefix and registers each as it is made.
struct Builder<'a> {
    registry: &'a Registry,
    prefix: &'a str,
    schema: RefCell<Vec<FamilySchema>>,
}

impl Builder<'_> {
    fn register<C: Collector + Clone + 'static>(&self, collector: C) -> prometheus::Result<C> {
        self.registry.register(Box::new(collector.clone()))?;
        self.schema.borrow_mut().extend(describe(&collector));
        Ok(collector)
    }

    fn opts(&self, name: &str, help: &str) -> Opts {
        Opts::new(name, help).namespace(self.prefix)
    }

    /// A family named by the OpenTelemetry GenAI conventions (as Prometheus writes them),
    /// without the prefix, so that dashboards made for those conventions read it.
    fn gen_ai_histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> prometheus::Result<HistogramVec> {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.register(HistogramVec::new(opts, labels)?)
    }

    fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        self.register(IntCounterVec::new(self.opts(name, help), labels)?)
    }

    fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
        self.register(IntGaugeVec::new(self.opts(name, help), labels)?)
    }

    fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> prometheus::Result<HistogramVec> {
        let opts = HistogramOpts::from(self.opts(name, help)).buckets(buckets.to_vec());
        self.register(HistogramVec::new(opts, labels)?)
    }
}

impl Families {
    /// Registers every family on `registry`, named `{prefix}_{family}` (just `{family}` for an
    /// empty prefix), and describes what it registered.
    pub fn register(
        registry: &Registry,
        prefix: &str,
    ) -> prometheus::Result<(Families, Vec<FamilySchema>)> {
        let b = Builder {
            registry,
            prefix,
            schema: RefCell::default(),
        };
        let families = Families {
            http_requests: b.counter(
                "http_requests_total",
                "HTTP requests seen on watched ports, by the status of their response.",
                &["role", "port", "method", "route", "code"],
            )?,
            http_duration: b.histogram(
                "http_request_duration_seconds",
                "Request first byte to response last byte, streams included.",
                &["role", "method", "route", "code"],
                DURATION_BUCKETS,
            )?,
            http_first_byte: b.histogram(
                "http_time_to_first_byte_seconds",
                "Request last byte to response status line.",
                &["role", "route"],
                FIRST_BYTE_BUCKETS,
            )?,
            http_request_size: b.histogram(
                "http_request_size_bytes",
                "Request body size after de-chunking.",
                &["role", "route"],
                SIZE_BUCKETS,
            )?,
            http_response_size: b.histogram(
                "http_response_size_bytes",
                "Response body size after de-chunking.",
                &["role", "route"],
                SIZE_BUCKETS,
            )?,
            http_in_flight: b.gauge(
                "http_requests_in_flight",
                "Requests whose response has not ended yet.",
                &["role"],
            )?,
            http_parse_errors: b.counter(
                "http_parse_errors_total",
                "Bytes on watched connections that could not be read as HTTP, by reason.",
                &["role", "reason"],
            )?,
            tcp_active: b.gauge(
                "tcp_connections_active",
                "Watched TCP connections open now, at the end where their exchanges are counted (a relay's are not).",
                &["role"],
            )?,
            tcp_opened: b.counter(
                "tcp_connections_opened_total",
                "Watched TCP connections opened: ends that started counting (not those found open at start).",
                &["role"],
            )?,
            tcp_closed: b.counter(
                "tcp_connections_closed_total",
                "Watched TCP connections closed: counted ends that closed or stopped counting.",
                &["role"],
            )?,
            tcp_bytes: b.counter(
                "tcp_bytes_total",
                "Bytes moved on watched connections, as seen by the observed process.",
                &["role", "direction"],
            )?,
            gateway_overhead: b.histogram(
                "gateway_overhead_seconds",
                "Gateway request duration minus the duration of the upstream request it made.",
                &["route"],
                OVERHEAD_BUCKETS,
            )?,
            gateway_first_byte_overhead: b.histogram(
                "gateway_first_byte_overhead_seconds",
                "Gateway time to first byte minus the upstream's time to first byte.",
                &["route"],
                OVERHEAD_BUCKETS,
            )?,
            gateway_unmatched: b.counter(
                "gateway_unmatched_exchanges_total",
                "Gateway or upstream exchanges that could not be paired with their counterpart.",
                &["role"],
            )?,
            gen_ai_first_token: b.gen_ai_histogram(
                "gen_ai_server_time_to_first_token_seconds",
                "Request last byte to the first body bytes carrying model output (reasoning included).",
                &["role", GEN_AI_LABELS[0], GEN_AI_LABELS[1], GEN_AI_LABELS[2]],
                GEN_AI_TTFT_BUCKETS,
            )?,
            gen_ai_duration: b.gen_ai_histogram(
                "gen_ai_server_request_duration_seconds",
                "Model request first byte to response last byte, by model; error_type names a failure.",
                &[
                    "role",
                    GEN_AI_LABELS[0],
                    GEN_AI_LABELS[1],
                    GEN_AI_LABELS[2],
                    "error_type",
                ],
                GEN_AI_DURATION_BUCKETS,
            )?,
            gen_ai_tokens: b.gen_ai_histogram(
                "gen_ai_client_token_usage",
                "Tokens per model request the server reported: input (prompt) and output (completion).",
                &[
                    "role",
                    GEN_AI_LABELS[0],
                    GEN_AI_LABELS[1],
                    GEN_AI_LABELS[2],
                    "gen_ai_token_type",
                ],
                GEN_AI_TOKEN_BUCKETS,
            )?,
            gen_ai_time_per_output_token: b.gen_ai_histogram(
                "gen_ai_server_time_per_output_token_seconds",
                "Generation time per output token after the first (Ollama's eval_duration / eval_count).",
                &GEN_AI_LABELS,
                GEN_AI_TPOT_BUCKETS,
            )?,
            llm_requests: b.counter(
                "llm_requests_total",
                "Model requests, by how the generation ended.",
                &["role", "model", "done_reason"],
            )?,
            llm_inter_chunk: b.histogram(
                "llm_inter_chunk_seconds",
                "Mean time between streamed chunks of one response.",
                &["model"],
                INTER_CHUNK_BUCKETS,
            )?,
            llm_phase: b.histogram(
                "llm_request_phase_seconds",
                "Where a request's time went: queue (waiting for a slot), load, prefill, decode (Ollama's own timings), outside (the rest of the wire duration).",
                &["model", "phase"],
                PHASE_BUCKETS,
            )?,
            llm_prompt_tokens_per_second: b.histogram(
                "llm_prompt_tokens_per_second",
                "Prompt tokens per second of prompt processing (prefill).",
                &["model"],
                PROMPT_TOKENS_PER_SECOND_BUCKETS,
            )?,
            llm_first_answer: b.histogram(
                "llm_time_to_first_answer_seconds",
                "Request last byte to the first answer chunk, for responses that reasoned (thinking) first.",
                &["model"],
                FIRST_BYTE_BUCKETS,
            )?,
            llm_tool_calls: b.counter(
                "llm_tool_calls_total",
                "Tool calls in model responses.",
                &["role", "model"],
            )?,
            llm_estimated_tokens: b.counter(
                "llm_estimated_completion_tokens_total",
                "Completion tokens counted from streamed chunks where the server reported none (one per chunk).",
                &["role", "model"],
            )?,
            llm_rejected: b.counter(
                "llm_rejected_requests_total",
                "Model requests the server refused: server_busy (503, queue full) or context_exceeded (400, prompt too long with truncate false).",
                &["role", "model", "reason"],
            )?,
            llm_prompts_at_context: b.counter(
                "llm_prompts_at_context_total",
                "Requests whose prompt took half or more of the model's context: where Ollama cuts a longer prompt to, silently.",
                &["model"],
            )?,
            llm_wait_after_cancel: b.histogram(
                "llm_wait_after_cancel_seconds",
                "Queue wait of the first request of a model to finish after a request of it was cancelled.",
                &["model"],
                PHASE_BUCKETS,
            )?,
            llm_server_info: b.gauge(
                "llm_server_info",
                "Always 1: the model server's settings, read from its environment (Ollama's defaults where unset).",
                &[
                    "pid",
                    "num_parallel",
                    "max_queue",
                    "max_loaded_models",
                    "context_length",
                    "keep_alive",
                ],
            )?,
            llm_slots: b.gauge(
                "llm_slots",
                "Requests the model servers run at once: OLLAMA_NUM_PARALLEL times the models loaded (at least one), summed over servers.",
                &[],
            )?,
            llm_waiting: b.gauge(
                "llm_requests_waiting",
                "Upstream requests in flight beyond the server's slots: waiting for a slot now.",
                &[],
            )?,
            websocket_messages: b.counter(
                "websocket_messages_total",
                "WebSocket messages on watched connections after an upgrade, by direction and kind (control frames included).",
                &["role", "direction", "kind"],
            )?,
            websocket_unread: b.counter(
                "websocket_unread_total",
                "WebSocket messages or frames that could not be read, by reason.",
                &["role", "reason"],
            )?,
            rpc_calls: b.counter(
                "rpc_calls_total",
                "Calls over WebSocket (a request and its final response), by method and outcome.",
                &["role", "method", "outcome"],
            )?,
            rpc_duration: b.histogram(
                "rpc_call_duration_seconds",
                "Call request first byte to final response last byte.",
                &["role", "method", "outcome"],
                DURATION_BUCKETS,
            )?,
            rpc_first_delta: b.histogram(
                "rpc_time_to_first_delta_seconds",
                "Call request last byte to the first event carrying model text.",
                &["role", "method"],
                FIRST_BYTE_BUCKETS,
            )?,
            rpc_tokens: b.counter(
                "rpc_tokens_total",
                "Tokens a call's final response reported, prompt (input) and completion (output).",
                &["role", "method", "type"],
            )?,
            rpc_gateway_overhead: b.histogram(
                "rpc_gateway_overhead_seconds",
                "A turn's duration minus the time covered by the upstream requests the gateway made inside it.",
                &["method"],
                TURN_OVERHEAD_BUCKETS,
            )?,
            rpc_unpaired: b.counter(
                "rpc_unpaired_calls_total",
                "Turns (agent, chat.send) inside which the gateway made no upstream request.",
                &["method"],
            )?,
            ebpf_events: b.counter(
                "ebpf_events_total",
                "Events read from the kernel ring buffer, by kind.",
                &["kind"],
            )?,
            ebpf_lost: b.counter(
                "ebpf_events_lost_total",
                "Events the kernel side could not deliver, by kind.",
                &["kind"],
            )?,
            build_info: b.gauge(
                "build_info",
                "Always 1: the observer's version and capture mode.",
                &["version", "mode"],
            )?,
        };
        Ok((families, b.schema.into_inner()))
    }
}
