//! The metric families of SPEC §5: names, HELP text, label names and buckets, registered once
//! on the [`Metrics`](super::Metrics) registry.
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
/// Generation speed: 1 to 1000 tokens/s.
pub const TOKENS_PER_SECOND_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0,
];
/// Time between streamed chunks: 1 ms to 5 s.
pub const INTER_CHUNK_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Model load time: 10 ms to 5 minutes.
pub const LOAD_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
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
    pub http_first_chunk: HistogramVec,
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
    pub llm_requests: IntCounterVec,
    pub llm_tokens: IntCounterVec,
    pub llm_tokens_per_second: HistogramVec,
    pub llm_inter_chunk: HistogramVec,
    pub llm_load_duration: HistogramVec,
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
            http_first_chunk: b.histogram(
                "http_time_to_first_chunk_seconds",
                "Request last byte to the first body bytes carrying model output.",
                &["role", "route", "model"],
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
            llm_requests: b.counter(
                "llm_requests_total",
                "Model requests, by how the generation ended.",
                &["role", "model", "done_reason"],
            )?,
            llm_tokens: b.counter(
                "llm_tokens_total",
                "Tokens the model server reported, prompt and completion.",
                &["role", "model", "type"],
            )?,
            llm_tokens_per_second: b.histogram(
                "llm_output_tokens_per_second",
                "Completion tokens per second of generation.",
                &["model"],
                TOKENS_PER_SECOND_BUCKETS,
            )?,
            llm_inter_chunk: b.histogram(
                "llm_inter_chunk_seconds",
                "Mean time between streamed chunks of one response.",
                &["model"],
                INTER_CHUNK_BUCKETS,
            )?,
            llm_load_duration: b.histogram(
                "llm_load_duration_seconds",
                "Time the model server spent loading the model for a request.",
                &["model"],
                LOAD_DURATION_BUCKETS,
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
