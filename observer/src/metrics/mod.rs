//! The daemon's Prometheus metrics (docs/DESIGN.md#metrics): one [`Metrics`] owning a custom
//! registry (no global one), fed with exchanges and counts by the pipeline, encoded for `/metrics`.
//!
//! Owns the mapping from an [`Exchange`] to observations: which families, which label values,
//! which units. Label values come from bounded sets (`labels`); the only payload text that
//! becomes a label is a model name, capped at 32 distinct values. Nothing here parses traffic
//! or decides what an exchange is; it must not log or label request paths, prompts or bodies.

pub mod capacity;
pub mod families;
pub mod handles;
pub mod labels;
pub mod openmetrics;
pub mod schema;
pub mod scrape;

#[cfg(test)]
mod tests;

use anyhow::Context as _;
use prometheus::{Encoder as _, Registry, TextEncoder, process_collector::ProcessCollector};

pub use self::openmetrics::ExpositionFormat;
use self::{
    capacity::CapacityBoard,
    families::Families,
    handles::{Handles, HttpKey},
    labels::{ModelLabels, NONE, Routes},
    schema::{FamilySchema, describe},
};
use crate::base::{Direction, Role};
use crate::engine::{Call, CallOutcome, Exchange, MessageKind, Unread};

/// What the metrics are named and labelled with.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Family names are `{prefix}_{family}`; empty for no prefix.
    pub prefix: String,
    /// `--route` additions to the known routes.
    pub extra_routes: Vec<String>,
    /// `ebpf` or `proxy`, for `build_info`.
    pub mode: &'static str,
    /// Whose exchanges feed the role-less `llm_*` histograms: the upstream when an upstream port
    /// is watched, so that one generation seen by gateway and upstream is observed once.
    pub llm_role: Role,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            prefix: "observer".into(),
            extra_routes: Vec::new(),
            mode: "ebpf",
            llm_role: Role::Upstream,
        }
    }
}

/// Every metric the daemon exports, and the registry they are exported from.
/// The kinds of ring buffer event, as `observer_ebpf_events_total` labels them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EbpfEventKind {
    Data = 0,
    Open = 1,
    Close = 2,
}

impl EbpfEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EbpfEventKind::Data => "data",
            EbpfEventKind::Open => "open",
            EbpfEventKind::Close => "close",
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    prefix: String,
    families: Families,
    routes: Routes,
    models: ModelLabels,
    /// Error codes of calls over WebSocket admitted as `outcome` values (bounded like models).
    rpc_errors: ModelLabels,
    llm_role: Role,
    capacity: CapacityBoard,
    /// Run before each scrape: they publish what pipelines gathered (see [`handles`]).
    before_gather: GatherHooks,
    /// Held shared by each publish and exclusively by each gather, so that a scrape sees a
    /// publish whole or not at all: never `http_requests_total` counted while the same
    /// exchange's `http_request_duration_seconds` is not yet.
    publishing: std::sync::RwLock<()>,
    /// What is registered, for `observer metrics-reference`.
    schema: std::sync::Mutex<Vec<FamilySchema>>,
}

type GatherHook = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct GatherHooks(std::sync::Mutex<Vec<GatherHook>>);

impl std::fmt::Debug for GatherHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatherHooks")
    }
}

impl GatherHooks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<GatherHook>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

impl Metrics {
    pub fn new(config: MetricsConfig) -> anyhow::Result<Metrics> {
        labels::validate_prefix(&config.prefix)?;
        let routes = Routes::new(config.extra_routes).context("invalid --route")?;
        let registry = Registry::new();
        let (families, mut schema) = Families::register(&registry, &config.prefix)
            .context("registering the metric families")?;
        let process = ProcessCollector::for_self();
        schema.extend(describe(&process));
        registry
            .register(Box::new(process))
            .context("registering the process collector")?;
        families
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), config.mode])
            .set(1);
        let capacity = CapacityBoard::new(&families);
        Ok(Metrics {
            registry,
            prefix: config.prefix,
            families,
            routes,
            models: ModelLabels::default(),
            rpc_errors: ModelLabels::default(),
            llm_role: config.llm_role,
            capacity,
            before_gather: GatherHooks::default(),
            publishing: std::sync::RwLock::new(()),
            schema: std::sync::Mutex::new(schema),
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The metric name prefix (`--metric-prefix`), for collectors that name their own families.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Registers a collector that renders its own families at scrape time (GPU, processes).
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) -> anyhow::Result<()> {
        let described = describe(collector.as_ref());
        self.registry
            .register(collector)
            .context("registering a metrics collector")?;
        self.schema
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend(described);
        Ok(())
    }

    /// Every family registered so far, by name.
    pub fn schema(&self) -> Vec<FamilySchema> {
        let mut schema = self
            .schema
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        schema.sort_by(|a, b| a.name.cmp(&b.name));
        schema
    }

    /// The `route` label of a request path: a known route, an extra route, or `other`.
    pub fn route(&self, path: &str) -> &str {
        self.routes.route(path)
    }

    /// Records one finished exchange: the `http_*` families, and the `llm_*` families when the
    /// request named a model.
    pub fn observe_exchange(&self, ex: &Exchange) {
        let mut handles = Handles::default();
        self.record_exchange(ex, &mut handles);
        self.publish(&mut handles);
    }

    /// [`Metrics::observe_exchange`] into a pipeline's `handles`, shown once they are published
    /// ([`Metrics::publish`]).
    pub fn record_exchange(&self, ex: &Exchange, handles: &mut Handles) {
        let f = &self.families;
        let role = ex.conn.role.as_str();
        let method = ex.method.as_str();
        let route_id = self.routes.id(&ex.path);
        let route = self.routes.name(route_id);
        let code = || labels::status_code(ex.status);
        let http = handles.http(HttpKey {
            role: ex.conn.role,
            port: ex.conn.port,
            method: ex.method,
            route: route_id,
            status: ex.status,
        });
        http.requests
            .get_or_insert_with(|| {
                let port = ex.conn.port.to_string();
                f.http_requests
                    .with_label_values(&[role, &port, method, route, &code()])
                    .local()
            })
            .inc();
        if let Some(ns) = ex.ts.duration_ns() {
            http.duration
                .get_or_insert_with(|| {
                    f.http_duration
                        .with_label_values(&[role, method, route, &code()])
                        .local()
                })
                .observe(seconds(ns));
        }
        if let Some(ns) = ex.ts.time_to_first_byte_ns() {
            http.first_byte
                .get_or_insert_with(|| f.http_first_byte.with_label_values(&[role, route]).local())
                .observe(seconds(ns));
        }
        http.request_size
            .get_or_insert_with(|| {
                f.http_request_size
                    .with_label_values(&[role, route])
                    .local()
            })
            .observe(ex.request_body_bytes as f64);
        http.response_size
            .get_or_insert_with(|| {
                f.http_response_size
                    .with_label_values(&[role, route])
                    .local()
            })
            .observe(ex.response_body_bytes as f64);

        let model = self.models.label_or_none(ex.llm.model.as_deref());
        if model != NONE {
            self.observe_llm(ex, model);
        }
    }

    /// The model families of one exchange whose request named `model`: the GenAI conventions'
    /// (`gen_ai_*`) and the project's (`llm_*`).
    fn observe_llm(&self, ex: &Exchange, model: &str) {
        let f = &self.families;
        let llm = &ex.llm;
        let role = ex.conn.role.as_str();
        let (operation, provider) = labels::gen_ai_api(&ex.path);
        f.llm_requests
            .with_label_values(&[role, model, labels::done_reason(llm)])
            .inc();
        if let Some(ns) = ex.ts.duration_ns() {
            let error_type = labels::error_type(ex);
            f.gen_ai_duration
                .with_label_values(&[role, operation, provider, model, &error_type])
                .observe(seconds(ns));
        }
        if operation != "embeddings"
            && let Some(ns) = ex.ts.time_to_first_chunk_ns()
        {
            f.gen_ai_first_token
                .with_label_values(&[role, operation, provider, model])
                .observe(seconds(ns));
        }
        for (kind, tokens) in [
            ("input", llm.prompt_tokens),
            ("output", llm.completion_tokens),
        ] {
            if let Some(tokens) = tokens {
                f.gen_ai_tokens
                    .with_label_values(&[role, operation, provider, model, kind])
                    .observe(tokens as f64);
            }
        }
        if let Some(tokens) = llm.estimated_completion_tokens {
            f.llm_estimated_tokens
                .with_label_values(&[role, model])
                .inc_by(tokens);
        }
        if llm.tool_calls > 0 {
            f.llm_tool_calls
                .with_label_values(&[role, model])
                .inc_by(llm.tool_calls);
        }
        if let Some(rejection) = llm.rejection
            && matches!(ex.status, Some(400 | 503))
        {
            f.llm_rejected
                .with_label_values(&[role, model, rejection.as_str()])
                .inc();
        }
        if ex.conn.role == self.llm_role {
            self.observe_generation(ex, [operation, provider, model]);
        }
    }

    /// The families observed once per generation, from the role [`MetricsConfig::llm_role`]
    /// names: speeds, the time split, the context, what followed a cancellation.
    fn observe_generation(&self, ex: &Exchange, gen_ai: [&str; 3]) {
        let f = &self.families;
        let llm = &ex.llm;
        let model = gen_ai[2];
        if let Some(ns) = time_per_output_token_ns(ex) {
            f.gen_ai_time_per_output_token
                .with_label_values(&gen_ai)
                .observe(seconds(ns));
        }
        if let Some(ns) = llm.inter_chunk_ns(ex.ts.first_chunk) {
            f.llm_inter_chunk
                .with_label_values(&[model])
                .observe(seconds(ns));
        }
        if llm.thinking_chunks > 0
            && let Some(answer) = llm.first_answer_ns
        {
            f.llm_first_answer
                .with_label_values(&[model])
                .observe(seconds(answer.saturating_sub(ex.ts.request_last)));
        }
        if let (Some(tokens), Some(ns)) = (llm.prompt_tokens, llm.prompt_eval_duration_ns)
            && tokens > 0
            && ns > 0
        {
            f.llm_prompt_tokens_per_second
                .with_label_values(&[model])
                .observe(tokens as f64 / seconds(ns));
        }
        let cancelled = labels::done_reason(llm) == "incomplete" && ex.status == Some(200);
        let split = TimeSplit::of(ex);
        let after_cancel = self
            .capacity
            .after_cancel(model, cancelled, split.is_some());
        if let Some(split) = split {
            for (phase, ns) in split.phases() {
                f.llm_phase
                    .with_label_values(&[model, phase])
                    .observe(seconds(ns));
            }
            if after_cancel {
                f.llm_wait_after_cancel
                    .with_label_values(&[model])
                    .observe(seconds(split.queue_ns));
            }
        }
        if let (Some(tokens), Some(context)) =
            (llm.prompt_tokens, self.capacity.context_length(model))
            && tokens * 2 >= context
        {
            f.llm_prompts_at_context.with_label_values(&[model]).inc();
        }
    }

    /// The model servers' capacity, for the collectors and the probe to fill in.
    pub fn capacity(&self) -> CapacityBoard {
        self.capacity.clone()
    }

    /// Records what the gateway added to one request; negative overheads (clock order, partial
    /// captures) count as zero.
    pub fn observe_gateway_overhead(
        &self,
        route_path: &str,
        overhead_s: f64,
        first_byte_overhead_s: Option<f64>,
    ) {
        let mut handles = Handles::default();
        self.record_gateway_overhead(route_path, overhead_s, first_byte_overhead_s, &mut handles);
        self.publish(&mut handles);
    }

    /// [`Metrics::observe_gateway_overhead`] into a pipeline's `handles`.
    pub fn record_gateway_overhead(
        &self,
        route_path: &str,
        overhead_s: f64,
        first_byte_overhead_s: Option<f64>,
        handles: &mut Handles,
    ) {
        let f = &self.families;
        let route_id = self.routes.id(route_path);
        let route = self.routes.name(route_id);
        let series = handles.overhead(route_id);
        series
            .overhead
            .get_or_insert_with(|| f.gateway_overhead.with_label_values(&[route]).local())
            .observe(overhead_s.max(0.0));
        if let Some(overhead) = first_byte_overhead_s {
            series
                .first_byte
                .get_or_insert_with(|| {
                    f.gateway_first_byte_overhead
                        .with_label_values(&[route])
                        .local()
                })
                .observe(overhead.max(0.0));
        }
    }

    /// Counts gateway or upstream exchanges the correlator could not pair.
    pub fn count_unmatched(&self, role: Role, n: u64) {
        self.families
            .gateway_unmatched
            .with_label_values(&[role.as_str()])
            .inc_by(n);
    }

    /// Adds what `handles` gathered to the shared series (see [`handles`]).
    pub fn publish(&self, handles: &mut Handles) {
        // Publishes exclude only gathers, not each other.
        let _publishing = self
            .publishing
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let f = &self.families;
        handles.publish(|in_flight, role| {
            let family = if in_flight {
                &f.http_in_flight
            } else {
                &f.tcp_active
            };
            family.with_label_values(&[role.as_str()])
        });
    }

    /// Counts an opened connection; `tcp_connections_active` moves with a pipeline's connection
    /// table instead ([`Handles::add_connections_active`]), so it cannot drift.
    pub fn connection_opened(&self, role: Role) {
        self.families
            .tcp_opened
            .with_label_values(&[role.as_str()])
            .inc();
    }

    /// Counts a closed connection (see [`Metrics::connection_opened`]).
    pub fn connection_closed(&self, role: Role) {
        self.families
            .tcp_closed
            .with_label_values(&[role.as_str()])
            .inc();
    }

    pub fn add_bytes(&self, role: Role, direction: Direction, n: u64) {
        let mut handles = Handles::default();
        self.record_bytes(role, direction, n, &mut handles);
        self.publish(&mut handles);
    }

    /// [`Metrics::add_bytes`] into a pipeline's `handles`.
    pub fn record_bytes(&self, role: Role, direction: Direction, n: u64, handles: &mut Handles) {
        handles
            .bytes(role, direction, || {
                let direction = match direction {
                    Direction::Ingress => "ingress",
                    Direction::Egress => "egress",
                };
                self.families
                    .tcp_bytes
                    .with_label_values(&[role.as_str(), direction])
                    .local()
            })
            .inc_by(n);
    }

    /// One finished call over WebSocket: `rpc_*`.
    pub fn record_call(&self, call: &Call) {
        let f = &self.families;
        let role = call.conn.role.as_str();
        let method = labels::rpc_method(&call.method);
        let outcome = match &call.outcome {
            CallOutcome::Error(code) => self.rpc_errors.label(code),
            other => other.as_str(),
        };
        f.rpc_calls
            .with_label_values(&[role, method, outcome])
            .inc();
        f.rpc_duration
            .with_label_values(&[role, method, outcome])
            .observe(seconds(call.duration_ns()));
        if let Some(ns) = call.time_to_first_delta_ns() {
            f.rpc_first_delta
                .with_label_values(&[role, method])
                .observe(seconds(ns));
        }
        for (kind, tokens) in [
            ("prompt", call.input_tokens),
            ("completion", call.output_tokens),
        ] {
            if let Some(tokens) = tokens {
                f.rpc_tokens
                    .with_label_values(&[role, method, kind])
                    .inc_by(tokens);
            }
        }
    }

    /// The gateway's own time in one turn over WebSocket.
    pub fn record_turn_overhead(&self, method: &str, overhead_s: f64) {
        self.families
            .rpc_gateway_overhead
            .with_label_values(&[labels::rpc_method(method)])
            .observe(overhead_s);
    }

    /// A turn over WebSocket in which no upstream request fell.
    pub fn count_unpaired_turn(&self, method: &str) {
        self.families
            .rpc_unpaired
            .with_label_values(&[labels::rpc_method(method)])
            .inc();
    }

    pub fn add_websocket_messages(
        &self,
        role: Role,
        direction: Direction,
        kind: MessageKind,
        n: u64,
    ) {
        let direction = match direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        self.families
            .websocket_messages
            .with_label_values(&[role.as_str(), direction, kind.as_str()])
            .inc_by(n);
    }

    pub fn add_websocket_unread(&self, role: Role, reason: Unread, n: u64) {
        self.families
            .websocket_unread
            .with_label_values(&[role.as_str(), reason.as_str()])
            .inc_by(n);
    }

    pub fn add_parse_errors(&self, role: Role, reason: &'static str, n: u64) {
        self.families
            .http_parse_errors
            .with_label_values(&[role.as_str(), reason])
            .inc_by(n);
    }

    pub fn add_ebpf_events(&self, kind: EbpfEventKind, n: u64) {
        self.families
            .ebpf_events
            .with_label_values(&[kind.as_str()])
            .inc_by(n);
    }

    /// One ring buffer event, counted in a pipeline's `handles` (no label lookup per event).
    pub fn record_ebpf_event(&self, kind: EbpfEventKind, handles: &mut Handles) {
        handles
            .ebpf_events(kind, || {
                self.families
                    .ebpf_events
                    .with_label_values(&[kind.as_str()])
                    .local()
            })
            .inc();
    }

    pub fn add_ebpf_lost(&self, kind: &'static str, n: u64) {
        self.families.ebpf_lost.with_label_values(&[kind]).inc_by(n);
    }

    /// Runs `hook` before every scrape: it publishes what pipelines that publish now and then
    /// (the proxy's) have gathered, so that a scrape sees every exchange finished before it.
    pub fn before_gather(&self, hook: GatherHook) {
        self.before_gather.lock().push(hook);
    }

    /// `llm_requests_waiting`: upstream requests in flight beyond the slots, where known.
    fn publish_waiting(&self) {
        let f = &self.families;
        let Some(slots) = self.capacity.slots() else {
            return;
        };
        let in_flight = f
            .http_in_flight
            .with_label_values(&[Role::Upstream.as_str()])
            .get()
            .max(0) as u64;
        f.llm_waiting
            .with_label_values(&[] as &[&str])
            .set(in_flight.saturating_sub(slots) as i64);
    }

    /// The exposition in `format`, with its content type.
    pub fn encode(&self, format: ExpositionFormat) -> (&'static str, Vec<u8>) {
        // The hooks publish, so they run before the gather takes its exclusive hold.
        for hook in self.before_gather.lock().iter() {
            hook();
        }
        self.publish_waiting();
        let families = {
            let _gathering = self
                .publishing
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.registry.gather()
        };
        let body = match format {
            ExpositionFormat::OpenMetrics => openmetrics::encode(&families).into_bytes(),
            ExpositionFormat::Text => {
                let mut body = Vec::with_capacity(16 * 1024);
                // Fails only for a family without samples or name, which gather() never returns.
                if let Err(err) = TextEncoder::new().encode(&families, &mut body) {
                    tracing::warn!(%err, "encoding metrics");
                }
                body
            }
        };
        (format.content_type(), body)
    }
}

/// Time per output token after the first: the server's own `eval_duration / eval_count` when it
/// reported them, else the span from the first chunk to the end of the response over the
/// completion tokens after the first.
fn time_per_output_token_ns(ex: &Exchange) -> Option<u64> {
    let llm = &ex.llm;
    let tokens = llm.completion_tokens?;
    if let Some(eval_ns) = llm.eval_duration_ns.filter(|&ns| ns > 0) {
        return (tokens > 0).then(|| eval_ns / tokens);
    }
    if tokens < 2 {
        return None;
    }
    let end = ex.ts.response_last.or(llm.last_chunk_ns)?;
    let span = end.checked_sub(ex.ts.first_chunk?).filter(|&ns| ns > 0)?;
    Some(span / (tokens - 1))
}

/// Where one request's time went, from Ollama's final line (nanoseconds): `load_duration`
/// (finding or loading the model), the wait for a parallel slot (which Ollama reports nowhere
/// but in `total_duration`: what the other three leave of it), `prompt_eval_duration` (prefill),
/// `eval_duration` (decode); `outside` is what the wire duration holds beyond `total_duration`
/// (the network, HTTP, and on a gateway's side the gateway). queue + load + prefill + decode
/// = total, unless Ollama's own timers disagree by more than that (then queue is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeSplit {
    pub queue_ns: u64,
    pub load_ns: u64,
    pub prefill_ns: u64,
    pub decode_ns: u64,
    pub outside_ns: Option<u64>,
}

impl TimeSplit {
    pub fn of(ex: &Exchange) -> Option<TimeSplit> {
        let llm = &ex.llm;
        let total = llm.total_duration_ns?;
        let load = llm.load_duration_ns.unwrap_or(0);
        let prefill = llm.prompt_eval_duration_ns.unwrap_or(0);
        let decode = llm.eval_duration_ns.unwrap_or(0);
        Some(TimeSplit {
            queue_ns: total.saturating_sub(load + prefill + decode),
            load_ns: load,
            prefill_ns: prefill,
            decode_ns: decode,
            outside_ns: ex.ts.duration_ns().map(|wire| wire.saturating_sub(total)),
        })
    }

    fn phases(&self) -> impl Iterator<Item = (&'static str, u64)> {
        [
            ("queue", Some(self.queue_ns)),
            ("load", Some(self.load_ns)),
            ("prefill", Some(self.prefill_ns)),
            ("decode", Some(self.decode_ns)),
            ("outside", self.outside_ns),
        ]
        .into_iter()
        .filter_map(|(phase, ns)| Some((phase, ns?)))
    }
}
