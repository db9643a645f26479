//! Handcrafted exchanges in, exact series out: label sets, counts, sums and buckets of the
//! families `Metrics` fills, read back through the registry and the encoders.

use prometheus::proto::{Metric, MetricType};

use super::*;
use crate::base::{Direction, Side};
use crate::engine::{ConnMeta, LlmFields, Method, Outcome, Timestamps};

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;

fn metrics() -> Metrics {
    Metrics::new(MetricsConfig::default()).unwrap()
}

fn exchange(role: Role, path: &str, status: Option<u16>) -> Exchange {
    let port = match role {
        Role::Gateway => 18789,
        Role::Upstream => 11434,
    };
    Exchange {
        conn: ConnMeta {
            conn_id: 7,
            role,
            side: Side::Server,
            port,
            tgid: 4242,
        },
        method: Method::Post,
        path: path.into(),
        status,
        ts: Timestamps {
            request_first: 10 * S,
            request_last: 10 * S + 10 * MS,
            response_first: status.map(|_| 10 * S + 60 * MS),
            first_chunk: None,
            response_last: status.map(|_| 12 * S + 10 * MS),
        },
        request_body_bytes: 300,
        response_body_bytes: 5000,
        outcome: Outcome::Complete,
        exact: true,
        llm: LlmFields::default(),
        trace_id: None,
    }
}

/// A streamed `/api/chat` answered by llama3.2 in 2.01 s on the wire: 26 prompt tokens, 100
/// completion tokens in 1.4 s of eval, 0.1 s of load, 0.3 s of prompt eval, 1.9 s in all (so
/// 0.1 s waiting for a slot, 0.11 s outside Ollama), 101 chunks from 0.5 s to 2.0 s after the
/// request.
fn chat(role: Role, model: &str) -> Exchange {
    let mut ex = exchange(role, "/api/chat?trace=1", Some(200));
    ex.ts.first_chunk = Some(10 * S + 510 * MS);
    ex.llm = LlmFields {
        model: Some(model.into()),
        stream: Some(true),
        done_reason: Some("stop".into()),
        prompt_tokens: Some(26),
        completion_tokens: Some(100),
        eval_duration_ns: Some(1400 * MS),
        prompt_eval_duration_ns: Some(300 * MS),
        load_duration_ns: Some(100 * MS),
        total_duration_ns: Some(1900 * MS),
        chunks: 101,
        last_chunk_ns: Some(12 * S + 10 * MS),
        first_answer_ns: Some(10 * S + 510 * MS),
        ..LlmFields::default()
    };
    ex
}

/// The series of `name` whose label set is exactly `labels`.
fn series(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<(MetricType, Metric)> {
    let families = m.registry().gather();
    let family = families.iter().find(|f| f.name() == name)?;
    let mut want: Vec<_> = labels.to_vec();
    want.sort();
    family
        .get_metric()
        .iter()
        .find(|metric| {
            let mut have: Vec<_> = metric
                .get_label()
                .iter()
                .map(|pair| (pair.name(), pair.value()))
                .collect();
            have.sort();
            have == want
        })
        .map(|metric| (family.get_field_type(), metric.clone()))
}

/// A counter's or gauge's value.
fn value(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (kind, metric) = series(m, name, labels)?;
    Some(match kind {
        MetricType::COUNTER => metric.get_counter().value(),
        MetricType::GAUGE => metric.get_gauge().value(),
        other => panic!("{name} is a {other:?}"),
    })
}

/// A histogram's count and sum.
fn hist(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<(u64, f64)> {
    let (kind, metric) = series(m, name, labels)?;
    assert_eq!(kind, MetricType::HISTOGRAM, "{name}");
    let h = metric.get_histogram();
    Some((h.get_sample_count(), h.get_sample_sum()))
}

fn close(actual: f64, expected: f64) -> bool {
    (actual - expected).abs() < 1e-9
}

#[test]
fn a_streamed_chat_fills_http_and_llm_families() {
    let m = metrics();
    m.observe_exchange(&chat(Role::Upstream, "llama3.2:3b"));

    let request = [
        ("role", "upstream"),
        ("port", "11434"),
        ("method", "POST"),
        ("route", "/api/chat"),
        ("code", "200"),
    ];
    assert_eq!(
        value(&m, "observer_http_requests_total", &request),
        Some(1.0)
    );
    let timed = [request[0], request[2], request[3], request[4]];
    let (count, sum) = hist(&m, "observer_http_request_duration_seconds", &timed).unwrap();
    assert_eq!(count, 1);
    assert!(close(sum, 2.01), "{sum}");
    let role_route = [("role", "upstream"), ("route", "/api/chat")];
    let (_, ttfb) = hist(&m, "observer_http_time_to_first_byte_seconds", &role_route).unwrap();
    assert!(close(ttfb, 0.05), "{ttfb}");
    let gen_ai = [
        ("role", "upstream"),
        ("gen_ai_operation_name", "chat"),
        ("gen_ai_provider_name", "ollama"),
        ("gen_ai_request_model", "llama3.2:3b"),
    ];
    let (_, ttft) = hist(&m, "gen_ai_server_time_to_first_token_seconds", &gen_ai).unwrap();
    assert!(close(ttft, 0.5), "{ttft}");
    let (_, duration) = hist(
        &m,
        "gen_ai_server_request_duration_seconds",
        &[
            gen_ai[0],
            gen_ai[1],
            gen_ai[2],
            gen_ai[3],
            ("error_type", ""),
        ],
    )
    .unwrap();
    assert!(close(duration, 2.01), "{duration}");
    let sizes = |name| hist(&m, name, &role_route).unwrap();
    assert_eq!(sizes("observer_http_request_size_bytes"), (1, 300.0));
    assert_eq!(sizes("observer_http_response_size_bytes"), (1, 5000.0));

    let llm = [("role", "upstream"), ("model", "llama3.2:3b")];
    let requests = [llm[0], llm[1], ("done_reason", "stop")];
    assert_eq!(
        value(&m, "observer_llm_requests_total", &requests),
        Some(1.0)
    );
    let tokens = |kind| {
        hist(
            &m,
            "gen_ai_client_token_usage",
            &[
                gen_ai[0],
                gen_ai[1],
                gen_ai[2],
                gen_ai[3],
                ("gen_ai_token_type", kind),
            ],
        )
    };
    assert_eq!(tokens("input"), Some((1, 26.0)));
    assert_eq!(tokens("output"), Some((1, 100.0)));
    let (_, per_token) = hist(
        &m,
        "gen_ai_server_time_per_output_token_seconds",
        &gen_ai[1..],
    )
    .unwrap();
    assert!(close(per_token, 0.014), "{per_token}");
    let model = [("model", "llama3.2:3b")];
    let (_, gap) = hist(&m, "observer_llm_inter_chunk_seconds", &model).unwrap();
    assert!(close(gap, 0.015), "{gap}");
    let (_, prefill) = hist(&m, "observer_llm_prompt_tokens_per_second", &model).unwrap();
    assert!(close(prefill, 26.0 / 0.3), "{prefill}");
    assert_eq!(
        hist(&m, "observer_llm_estimated_completion_tokens_total", &llm),
        None,
        "reported tokens are not estimated"
    );
}

#[test]
fn the_time_split_adds_up_to_ollamas_total() {
    let m = metrics();
    m.observe_exchange(&chat(Role::Upstream, "llama3.2:3b"));
    let phase = |phase| {
        hist(
            &m,
            "observer_llm_request_phase_seconds",
            &[("model", "llama3.2:3b"), ("phase", phase)],
        )
        .unwrap()
        .1
    };
    let (queue, load, prefill, decode) = (
        phase("queue"),
        phase("load"),
        phase("prefill"),
        phase("decode"),
    );
    assert!(close(queue, 0.1), "{queue}");
    assert!(close(load, 0.1), "{load}");
    assert!(close(prefill, 0.3), "{prefill}");
    assert!(close(decode, 1.4), "{decode}");
    assert!(
        close(queue + load + prefill + decode, 1.9),
        "Ollama's total_duration"
    );
    let outside = phase("outside");
    assert!(close(outside, 0.11), "wire 2.01 s − total 1.9 s: {outside}");
}

#[test]
fn buckets_hold_observations_where_they_belong() {
    let m = metrics();
    m.observe_exchange(&chat(Role::Upstream, "llama3.2:3b"));
    let (_, metric) = series(
        &m,
        "observer_http_request_duration_seconds",
        &[
            ("role", "upstream"),
            ("method", "POST"),
            ("route", "/api/chat"),
            ("code", "200"),
        ],
    )
    .unwrap();
    let buckets: Vec<(f64, u64)> = metric
        .get_histogram()
        .get_bucket()
        .iter()
        .map(|b| (b.upper_bound(), b.cumulative_count()))
        .collect();
    assert_eq!(buckets.len(), families::DURATION_BUCKETS.len());
    assert_eq!(buckets.last(), Some(&(300.0, 1)));
    assert!(buckets.contains(&(1.0, 0)) && buckets.contains(&(2.5, 1)));
}

#[test]
fn role_less_llm_histograms_come_from_the_llm_role_only() {
    let m = metrics();
    m.observe_exchange(&chat(Role::Gateway, "llama3.2:3b"));
    let gateway = [("role", "gateway"), ("model", "llama3.2:3b")];
    let requests = [gateway[0], gateway[1], ("done_reason", "stop")];
    assert_eq!(
        value(&m, "observer_llm_requests_total", &requests),
        Some(1.0)
    );
    let model = [("model", "llama3.2:3b")];
    let per_token = [
        ("gen_ai_operation_name", "chat"),
        ("gen_ai_provider_name", "ollama"),
        ("gen_ai_request_model", "llama3.2:3b"),
    ];
    assert_eq!(
        hist(
            &m,
            "gen_ai_server_time_per_output_token_seconds",
            &per_token
        ),
        None
    );
    let load = [model[0], ("phase", "load")];
    assert_eq!(hist(&m, "observer_llm_request_phase_seconds", &load), None);

    m.observe_exchange(&chat(Role::Upstream, "llama3.2:3b"));
    let (count, _) = hist(
        &m,
        "gen_ai_server_time_per_output_token_seconds",
        &per_token,
    )
    .unwrap();
    assert_eq!(count, 1);

    let gateway_fed = Metrics::new(MetricsConfig {
        llm_role: Role::Gateway,
        ..MetricsConfig::default()
    })
    .unwrap();
    gateway_fed.observe_exchange(&chat(Role::Gateway, "llama3.2:3b"));
    assert!(hist(&gateway_fed, "observer_llm_request_phase_seconds", &load).is_some());
}

#[test]
fn an_exchange_without_response_is_counted_but_not_timed() {
    let m = metrics();
    let mut ex = exchange(Role::Gateway, "/v1/chat/completions", None);
    ex.outcome = Outcome::Aborted;
    m.observe_exchange(&ex);
    let request = [
        ("role", "gateway"),
        ("port", "18789"),
        ("method", "POST"),
        ("route", "/v1/chat/completions"),
        ("code", "none"),
    ];
    assert_eq!(
        value(&m, "observer_http_requests_total", &request),
        Some(1.0)
    );
    let families = m.registry().gather();
    let names: Vec<&str> = families.iter().map(|f| f.name()).collect();
    assert!(
        !names.contains(&"observer_http_request_duration_seconds"),
        "{names:?}"
    );
    assert!(!names.contains(&"observer_http_time_to_first_byte_seconds"));
    assert!(!names.contains(&"observer_llm_requests_total"));
    let role_route = [("role", "gateway"), ("route", "/v1/chat/completions")];
    assert_eq!(
        hist(&m, "observer_http_request_size_bytes", &role_route),
        Some((1, 300.0))
    );
}

#[test]
fn an_exchange_without_a_model_feeds_no_model_family() {
    let m = metrics();
    let mut ex = exchange(Role::Upstream, "/api/tags", Some(200));
    ex.method = Method::Get;
    ex.ts.first_chunk = Some(10 * S + 70 * MS);
    m.observe_exchange(&ex);
    let names: Vec<String> = m
        .registry()
        .gather()
        .iter()
        .map(|f| f.name().to_owned())
        .collect();
    assert!(names.contains(&"observer_http_requests_total".to_owned()));
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("observer_llm_") || n.starts_with("gen_ai_")),
        "{names:?}"
    );
}

#[test]
fn errors_and_unknown_reasons_are_bounded() {
    let m = metrics();
    let mut failed = chat(Role::Upstream, "qwen3:8b");
    failed.llm.error = true;
    m.observe_exchange(&failed);
    let mut odd = chat(Role::Upstream, "qwen3:8b");
    odd.llm.done_reason = Some("user typed this".into());
    m.observe_exchange(&odd);
    let labels = |reason| {
        [
            ("role", "upstream"),
            ("model", "qwen3:8b"),
            ("done_reason", reason),
        ]
    };
    assert_eq!(
        value(&m, "observer_llm_requests_total", &labels("error")),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "observer_llm_requests_total", &labels("other")),
        Some(1.0)
    );
}

#[test]
fn time_per_output_token_falls_back_to_the_chunk_span() {
    let mut ex = chat(Role::Upstream, "m");
    assert_eq!(time_per_output_token_ns(&ex), Some(14 * MS), "1.4 s / 100");
    ex.llm.eval_duration_ns = None;
    ex.llm.completion_tokens = Some(16);
    // First chunk 10.51 s, response last 12.01 s: 1.5 s over the 15 tokens after the first.
    assert_eq!(time_per_output_token_ns(&ex), Some(100 * MS));
    ex.ts.response_last = None;
    ex.llm.last_chunk_ns = Some(11 * S + 260 * MS);
    assert_eq!(time_per_output_token_ns(&ex), Some(50 * MS));
    ex.llm.completion_tokens = Some(1);
    assert_eq!(
        time_per_output_token_ns(&ex),
        None,
        "no token after the first"
    );
    ex.llm.completion_tokens = None;
    ex.llm.eval_duration_ns = Some(S);
    assert_eq!(time_per_output_token_ns(&ex), None);
    let mut zero_eval = chat(Role::Upstream, "m");
    zero_eval.llm.eval_duration_ns = Some(0);
    assert_eq!(time_per_output_token_ns(&zero_eval), Some(1500 * MS / 99));
}

#[test]
fn the_33rd_model_is_other() {
    let m = metrics();
    for i in 0..33 {
        m.observe_exchange(&chat(Role::Upstream, &format!("model-{i}")));
    }
    let labels = |model| {
        [
            ("role", "upstream"),
            ("model", model),
            ("done_reason", "stop"),
        ]
    };
    assert_eq!(
        value(&m, "observer_llm_requests_total", &labels("model-31")),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "observer_llm_requests_total", &labels("model-32")),
        None
    );
    assert_eq!(
        value(&m, "observer_llm_requests_total", &labels("other")),
        Some(1.0)
    );
    let families = m.registry().gather();
    let requests = families
        .iter()
        .find(|f| f.name() == "observer_llm_requests_total")
        .unwrap();
    assert_eq!(requests.get_metric().len(), 33);
}

#[test]
fn routes_in_labels_come_from_the_fixed_set() {
    let m = Metrics::new(MetricsConfig {
        extra_routes: vec!["/v1/responses".into()],
        ..MetricsConfig::default()
    })
    .unwrap();
    assert_eq!(m.route("/api/generate?keep_alive=0"), "/api/generate");
    assert_eq!(m.route("/v1/responses"), "/v1/responses");
    assert_eq!(m.route("/users/alice/secrets"), "other");
    m.observe_exchange(&exchange(Role::Gateway, "/users/alice/secrets", Some(404)));
    let text = String::from_utf8(m.encode(ExpositionFormat::Text).1).unwrap();
    assert!(!text.contains("alice"), "{text}");
    assert!(text.contains(r#"route="other""#), "{text}");
}

#[test]
fn gateway_overhead_clamps_negative_values() {
    let m = metrics();
    m.observe_gateway_overhead("/api/chat?x", 0.002, Some(-0.001));
    m.observe_gateway_overhead("/nope", -0.5, None);
    let chat = [("route", "/api/chat")];
    assert_eq!(
        hist(&m, "observer_gateway_overhead_seconds", &chat),
        Some((1, 0.002))
    );
    let first_byte = hist(&m, "observer_gateway_first_byte_overhead_seconds", &chat);
    assert_eq!(first_byte, Some((1, 0.0)));
    let other = [("route", "other")];
    assert_eq!(
        hist(&m, "observer_gateway_overhead_seconds", &other),
        Some((1, 0.0))
    );
    assert_eq!(
        hist(&m, "observer_gateway_first_byte_overhead_seconds", &other),
        None
    );
}

#[test]
fn counters_and_gauges() {
    let m = metrics();
    m.count_unmatched(Role::Gateway, 2);
    let mut handles = Handles::default();
    handles.add_in_flight(Role::Upstream, 3);
    m.connection_opened(Role::Gateway);
    m.connection_opened(Role::Gateway);
    m.connection_closed(Role::Gateway);
    handles.add_connections_active(Role::Gateway, 1);
    m.publish(&mut handles);
    m.add_bytes(Role::Upstream, Direction::Ingress, 100);
    m.add_bytes(Role::Upstream, Direction::Egress, 7);
    m.add_bytes(Role::Upstream, Direction::Egress, 8);
    m.add_parse_errors(Role::Gateway, "bad_request_line", 4);
    m.add_ebpf_events(EbpfEventKind::Data, 10);
    m.add_ebpf_lost("data", 1);

    let gw = [("role", "gateway")];
    assert_eq!(
        value(&m, "observer_gateway_unmatched_exchanges_total", &gw),
        Some(2.0)
    );
    let up = [("role", "upstream")];
    assert_eq!(
        value(&m, "observer_http_requests_in_flight", &up),
        Some(3.0)
    );
    assert_eq!(
        value(&m, "observer_tcp_connections_opened_total", &gw),
        Some(2.0)
    );
    assert_eq!(
        value(&m, "observer_tcp_connections_closed_total", &gw),
        Some(1.0)
    );
    assert_eq!(value(&m, "observer_tcp_connections_active", &gw), Some(1.0));
    let bytes = |d| value(&m, "observer_tcp_bytes_total", &[up[0], ("direction", d)]);
    assert_eq!(bytes("ingress"), Some(100.0));
    assert_eq!(bytes("egress"), Some(15.0));
    let reason = [gw[0], ("reason", "bad_request_line")];
    assert_eq!(
        value(&m, "observer_http_parse_errors_total", &reason),
        Some(4.0)
    );
    let data = [("kind", "data")];
    assert_eq!(value(&m, "observer_ebpf_events_total", &data), Some(10.0));
    assert_eq!(
        value(&m, "observer_ebpf_events_lost_total", &data),
        Some(1.0)
    );
}

#[test]
fn build_info_process_metrics_and_prefix() {
    let m = Metrics::new(MetricsConfig {
        prefix: "ollama_gw".into(),
        mode: "proxy",
        ..MetricsConfig::default()
    })
    .unwrap();
    let labels = [("version", env!("CARGO_PKG_VERSION")), ("mode", "proxy")];
    assert_eq!(value(&m, "ollama_gw_build_info", &labels), Some(1.0));
    let names: Vec<String> = m
        .registry()
        .gather()
        .iter()
        .map(|f| f.name().into())
        .collect();
    assert!(
        names.iter().any(|n| n == "process_cpu_seconds_total"),
        "{names:?}"
    );

    let bare = Metrics::new(MetricsConfig {
        prefix: String::new(),
        ..MetricsConfig::default()
    })
    .unwrap();
    assert!(value(&bare, "build_info", &[labels[0], ("mode", "ebpf")]).is_some());

    let err = Metrics::new(MetricsConfig {
        prefix: "my-gateway".into(),
        ..MetricsConfig::default()
    })
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("metric prefix \"my-gateway\""),
        "{err:#}"
    );
    let err = Metrics::new(MetricsConfig {
        extra_routes: vec!["health".into()],
        ..MetricsConfig::default()
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("--route"), "{err:#}");
}

#[test]
fn both_expositions() {
    let m = metrics();
    m.observe_exchange(&chat(Role::Upstream, "llama3.2:3b"));

    let (content_type, text) = m.encode(ExpositionFormat::Text);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("# TYPE observer_http_requests_total counter\n"));
    assert!(text.contains(
        "observer_http_requests_total{code=\"200\",method=\"POST\",port=\"11434\",\
         role=\"upstream\",route=\"/api/chat\"} 1\n"
    ));
    assert!(!text.contains("# EOF"));

    let (content_type, om) = m.encode(ExpositionFormat::OpenMetrics);
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let om = String::from_utf8(om).unwrap();
    assert!(om.ends_with("\n# EOF\n"));
    assert_eq!(om.matches("# EOF").count(), 1);
    assert!(
        om.contains("# TYPE observer_http_requests counter\n"),
        "{om}"
    );
    assert!(om.contains(
        "observer_http_requests_total{code=\"200\",method=\"POST\",port=\"11434\",\
         role=\"upstream\",route=\"/api/chat\"} 1\n"
    ));
    assert!(om.contains("# TYPE process_cpu_seconds counter\n"), "{om}");
    assert!(om.contains("# TYPE observer_build_info gauge\n"));
    assert!(om.contains(
        "observer_http_request_duration_seconds_bucket{code=\"200\",method=\"POST\",\
         role=\"upstream\",route=\"/api/chat\",le=\"2.5\"} 1\n"
    ));
    for line in om.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split(' ').nth(2).unwrap();
        assert!(
            !line.ends_with(" counter") || !name.ends_with("_total"),
            "{line}"
        );
    }
}

#[test]
fn a_pipelines_handles_show_nothing_until_published_then_everything_once() {
    let m = metrics();
    let mut handles = Handles::default();
    for _ in 0..3 {
        m.record_exchange(
            &exchange(Role::Gateway, "/api/tags", Some(200)),
            &mut handles,
        );
    }
    m.record_bytes(Role::Gateway, Direction::Ingress, 100, &mut handles);
    handles.add_in_flight(Role::Gateway, 2);
    handles.add_connections_active(Role::Gateway, 1);
    let requests = [
        ("role", "gateway"),
        ("port", "18789"),
        ("method", "POST"),
        ("route", "/api/tags"),
        ("code", "200"),
    ];
    let duration = [
        ("role", "gateway"),
        ("method", "POST"),
        ("route", "/api/tags"),
        ("code", "200"),
    ];
    let role = [("role", "gateway")];
    let bytes = [("role", "gateway"), ("direction", "ingress")];
    // The series may exist (made with the handle), but nothing is counted in it yet.
    assert_eq!(
        value(&m, "observer_http_requests_total", &requests).unwrap_or(0.0),
        0.0
    );
    assert_eq!(
        value(&m, "observer_tcp_bytes_total", &bytes).unwrap_or(0.0),
        0.0
    );
    assert_eq!(value(&m, "observer_http_requests_in_flight", &role), None);
    for _ in 0..2 {
        // A second publish adds nothing that was published already.
        m.publish(&mut handles);
        assert_eq!(
            value(&m, "observer_http_requests_total", &requests),
            Some(3.0)
        );
        let (count, sum) = hist(&m, "observer_http_request_duration_seconds", &duration).unwrap();
        assert_eq!(count, 3);
        assert!(close(sum, 3.0 * 2.01), "{sum}");
        assert_eq!(value(&m, "observer_tcp_bytes_total", &bytes), Some(100.0));
        assert_eq!(
            value(&m, "observer_http_requests_in_flight", &role),
            Some(2.0)
        );
        assert_eq!(
            value(&m, "observer_tcp_connections_active", &role),
            Some(1.0)
        );
    }
    handles.add_in_flight(Role::Gateway, -2);
    m.publish(&mut handles);
    assert_eq!(
        value(&m, "observer_http_requests_in_flight", &role),
        Some(0.0)
    );
}

#[test]
fn a_full_handle_map_publishes_before_it_starts_over() {
    let m = metrics();
    let mut handles = Handles::default();
    let total = |m: &Metrics| -> f64 {
        m.registry()
            .gather()
            .iter()
            .filter(|f| f.name() == "observer_http_requests_total")
            .flat_map(|f| f.get_metric().iter().map(|s| s.get_counter().value()))
            .sum()
    };
    // One label set more than the map holds: each its own status code.
    let sets = handles::MAX_LABEL_SETS as u16 + 1;
    for code in 0..sets {
        let ex = exchange(Role::Upstream, "/api/tags", Some(100 + code));
        m.record_exchange(&ex, &mut handles);
    }
    assert_eq!(total(&m), f64::from(sets - 1));
    m.publish(&mut handles);
    assert_eq!(total(&m), f64::from(sets));
}

/// A scrape sees each publish whole: however it interleaves with a pipeline publishing, every
/// counted exchange is also timed.
#[test]
fn a_scrape_never_sees_half_a_publish() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use crate::metrics::scrape::Scrape;

    let m = Arc::new(metrics());
    let done = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (m, done) = (m.clone(), done.clone());
        std::thread::spawn(move || {
            let mut handles = Handles::default();
            let exchanges = [
                exchange(Role::Gateway, "/api/tags", Some(200)),
                exchange(Role::Gateway, "/api/chat", Some(500)),
                exchange(Role::Upstream, "/api/tags", Some(404)),
                exchange(Role::Upstream, "/v1/models", Some(200)),
            ];
            while !done.load(Ordering::Relaxed) {
                for ex in &exchanges {
                    m.record_exchange(ex, &mut handles);
                }
                m.publish(&mut handles);
            }
        })
    };
    let mut last = 0.0;
    for _ in 0..300 {
        let (_, text) = m.encode(ExpositionFormat::Text);
        let page = Scrape::parse_strict(&String::from_utf8(text).unwrap()).unwrap();
        let counted = page.sum("observer_http_requests_total", &[]);
        let timed = page.sum("observer_http_request_duration_seconds_count", &[]);
        assert_eq!(counted, timed, "a scrape in the middle of a publish");
        assert_eq!(counted % 4.0, 0.0, "a scrape in the middle of a publish");
        last = counted;
    }
    done.store(true, Ordering::Relaxed);
    publisher.join().unwrap();
    assert!(last > 0.0, "the publisher never published");
}

#[test]
fn rejections_tool_calls_estimates_and_thinking_have_families_of_their_own() {
    let m = metrics();
    let labels = [("role", "upstream"), ("model", "qwen3:0.6b")];
    let mut busy = exchange(Role::Upstream, "/api/chat", Some(503));
    busy.llm.model = Some("qwen3:0.6b".into());
    busy.llm.error = true;
    busy.llm.rejection = Some(crate::engine::Rejection::ServerBusy);
    m.observe_exchange(&busy);
    let mut long = exchange(Role::Upstream, "/api/embed", Some(400));
    long.llm.model = Some("qwen3:0.6b".into());
    long.llm.rejection = Some(crate::engine::Rejection::ContextExceeded);
    m.observe_exchange(&long);
    let rejected = |reason| {
        value(
            &m,
            "observer_llm_rejected_requests_total",
            &[labels[0], labels[1], ("reason", reason)],
        )
    };
    assert_eq!(rejected("server_busy"), Some(1.0));
    assert_eq!(rejected("context_exceeded"), Some(1.0));
    let errors = |error_type| {
        hist(
            &m,
            "gen_ai_server_request_duration_seconds",
            &[
                ("role", "upstream"),
                ("gen_ai_operation_name", "chat"),
                ("gen_ai_provider_name", "ollama"),
                ("gen_ai_request_model", "qwen3:0.6b"),
                ("error_type", error_type),
            ],
        )
        .map(|(count, _)| count)
    };
    assert_eq!(errors("503"), Some(1));

    // An OpenAI-style stream without usage that reasoned for 0.2 s and called a tool.
    let mut streamed = chat(Role::Upstream, "qwen3:0.6b");
    streamed.path = "/v1/chat/completions".into();
    streamed.llm.completion_tokens = None;
    streamed.llm.estimated_completion_tokens = Some(101);
    streamed.llm.tool_calls = 2;
    streamed.llm.thinking_chunks = 20;
    streamed.llm.first_answer_ns = Some(10 * S + 710 * MS);
    m.observe_exchange(&streamed);
    assert_eq!(
        value(
            &m,
            "observer_llm_estimated_completion_tokens_total",
            &labels
        ),
        Some(101.0)
    );
    assert_eq!(
        value(&m, "observer_llm_tool_calls_total", &labels),
        Some(2.0)
    );
    let model = [labels[1]];
    let (_, answer) = hist(&m, "observer_llm_time_to_first_answer_seconds", &model).unwrap();
    assert!(
        close(answer, 0.7),
        "request last 10.01 s → answer 10.71 s: {answer}"
    );
    assert_eq!(
        hist(
            &m,
            "gen_ai_client_token_usage",
            &[
                ("role", "upstream"),
                ("gen_ai_operation_name", "chat"),
                ("gen_ai_provider_name", "openai"),
                ("gen_ai_request_model", "qwen3:0.6b"),
                ("gen_ai_token_type", "output"),
            ],
        ),
        None,
        "estimates never mix with reported tokens"
    );
}

#[test]
fn capacity_comes_from_the_servers_settings_and_the_loaded_models() {
    use crate::server_settings::ServerSettings;
    let m = metrics();
    let names = |m: &Metrics| -> Vec<String> {
        m.registry()
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect()
    };
    m.encode(ExpositionFormat::Text);
    assert!(
        !names(&m).contains(&"observer_llm_slots".to_owned()),
        "unknown before a server's settings were read"
    );
    let settings = ServerSettings::from_environ(b"OLLAMA_NUM_PARALLEL=2\0OLLAMA_MAX_QUEUE=3\0");
    m.capacity().set_servers(&[(4242, settings)]);
    let info = [
        ("pid", "4242"),
        ("num_parallel", "2"),
        ("max_queue", "3"),
        ("max_loaded_models", "auto"),
        ("context_length", "auto"),
        ("keep_alive", "300s"),
    ];
    assert_eq!(value(&m, "observer_llm_server_info", &info), Some(1.0));
    assert_eq!(value(&m, "observer_llm_slots", &[]), Some(2.0));
    m.capacity()
        .set_loaded(&[("a:latest".into(), Some(1000)), ("b".into(), None)]);
    assert_eq!(
        value(&m, "observer_llm_slots", &[]),
        Some(4.0),
        "2 per model"
    );

    // Five upstream requests in flight against four slots: one waits.
    m.families
        .http_in_flight
        .with_label_values(&["upstream"])
        .set(5);
    m.encode(ExpositionFormat::Text);
    assert_eq!(value(&m, "observer_llm_requests_waiting", &[]), Some(1.0));
    m.families
        .http_in_flight
        .with_label_values(&["upstream"])
        .set(3);
    m.encode(ExpositionFormat::Text);
    assert_eq!(value(&m, "observer_llm_requests_waiting", &[]), Some(0.0));

    // `a` (listed as a:latest) has a context of 1000: a prompt of 500 reaches the limit Ollama
    // truncates to, 499 not.
    for prompt in [499, 500, 1000] {
        let mut ex = chat(Role::Upstream, "a");
        ex.llm.prompt_tokens = Some(prompt);
        m.observe_exchange(&ex);
    }
    assert_eq!(
        value(
            &m,
            "observer_llm_prompts_at_context_total",
            &[("model", "a")]
        ),
        Some(2.0)
    );
}

#[test]
fn the_request_after_a_cancelled_one_reports_its_wait() {
    let m = metrics();
    let mut cancelled = chat(Role::Upstream, "m");
    cancelled.outcome = Outcome::Aborted;
    cancelled.llm = LlmFields {
        model: Some("m".into()),
        done_reason: Some("incomplete".into()),
        ..LlmFields::default()
    };
    m.observe_exchange(&cancelled);
    let model = [("model", "m")];
    assert_eq!(
        hist(&m, "observer_llm_wait_after_cancel_seconds", &model),
        None
    );
    m.observe_exchange(&chat(Role::Upstream, "m"));
    let (count, wait) = hist(&m, "observer_llm_wait_after_cancel_seconds", &model).unwrap();
    assert_eq!(count, 1);
    assert!(close(wait, 0.1), "the queue phase: {wait}");
    m.observe_exchange(&chat(Role::Upstream, "m"));
    let (count, _) = hist(&m, "observer_llm_wait_after_cancel_seconds", &model).unwrap();
    assert_eq!(count, 1, "only the first request after the cancellation");
}
