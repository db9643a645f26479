//! Handcrafted exchanges in, exact series out: label sets, counts, sums and buckets of the
//! families `Metrics` fills, read back through the registry and the encoders.

use prometheus::proto::{Metric, MetricType};

use super::*;
use crate::{
    capture::decode::{Direction, Side},
    engine::{ConnMeta, LlmFields, Method, Outcome, Timestamps},
};

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

/// A streamed `/api/chat` answered by llama3.2: 26 prompt tokens, 100 completion tokens in 2 s
/// of eval, 1.5 s of load, 101 chunks from 0.5 s to 2.0 s after the request.
fn chat(role: Role, model: &str) -> Exchange {
    let mut ex = exchange(role, "/api/chat?trace=1", Some(200));
    ex.ts.first_chunk = Some(10 * S + 510 * MS);
    ex.llm = LlmFields {
        model: Some(model.into()),
        stream: Some(true),
        done_reason: Some("stop".into()),
        prompt_tokens: Some(26),
        completion_tokens: Some(100),
        eval_duration_ns: Some(2 * S),
        load_duration_ns: Some(1500 * MS),
        total_duration_ns: Some(4 * S),
        chunks: 101,
        last_chunk_ns: Some(12 * S + 10 * MS),
        error: false,
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
    let chunk_labels = [role_route[0], role_route[1], ("model", "llama3.2:3b")];
    let (_, ttfc) = hist(
        &m,
        "observer_http_time_to_first_chunk_seconds",
        &chunk_labels,
    )
    .unwrap();
    assert!(close(ttfc, 0.5), "{ttfc}");
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
        value(
            &m,
            "observer_llm_tokens_total",
            &[llm[0], llm[1], ("type", kind)],
        )
    };
    assert_eq!(tokens("prompt"), Some(26.0));
    assert_eq!(tokens("completion"), Some(100.0));
    let model = [("model", "llama3.2:3b")];
    let (_, rate) = hist(&m, "observer_llm_output_tokens_per_second", &model).unwrap();
    assert!(close(rate, 50.0), "{rate}");
    let (_, gap) = hist(&m, "observer_llm_inter_chunk_seconds", &model).unwrap();
    assert!(close(gap, 0.015), "{gap}");
    let (_, load) = hist(&m, "observer_llm_load_duration_seconds", &model).unwrap();
    assert!(close(load, 1.5), "{load}");
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
    assert_eq!(
        hist(&m, "observer_llm_output_tokens_per_second", &model),
        None
    );
    assert_eq!(hist(&m, "observer_llm_load_duration_seconds", &model), None);

    m.observe_exchange(&chat(Role::Upstream, "llama3.2:3b"));
    let (count, _) = hist(&m, "observer_llm_output_tokens_per_second", &model).unwrap();
    assert_eq!(count, 1);

    let gateway_fed = Metrics::new(MetricsConfig {
        llm_role: Role::Gateway,
        ..MetricsConfig::default()
    })
    .unwrap();
    gateway_fed.observe_exchange(&chat(Role::Gateway, "llama3.2:3b"));
    assert!(hist(&gateway_fed, "observer_llm_load_duration_seconds", &model).is_some());
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
fn a_non_llm_exchange_with_first_chunk_is_labelled_model_none() {
    let m = metrics();
    let mut ex = exchange(Role::Upstream, "/api/tags", Some(200));
    ex.method = Method::Get;
    ex.ts.first_chunk = Some(10 * S + 70 * MS);
    m.observe_exchange(&ex);
    let labels = [
        ("role", "upstream"),
        ("route", "/api/tags"),
        ("model", "none"),
    ];
    let (count, _) = hist(&m, "observer_http_time_to_first_chunk_seconds", &labels).unwrap();
    assert_eq!(count, 1);
    assert!(
        !m.registry()
            .gather()
            .iter()
            .any(|f| f.name().starts_with("observer_llm_"))
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
fn tokens_per_second_falls_back_to_the_chunk_span() {
    let mut ex = chat(Role::Upstream, "m");
    ex.llm.eval_duration_ns = None;
    ex.llm.completion_tokens = Some(20);
    // First chunk 10.51 s, response last 12.01 s: 1.5 s.
    assert!(close(output_tokens_per_second(&ex).unwrap(), 20.0 / 1.5));
    ex.ts.response_last = None;
    ex.llm.last_chunk_ns = Some(11 * S + 10 * MS);
    assert!(close(output_tokens_per_second(&ex).unwrap(), 40.0));
    ex.llm.completion_tokens = Some(0);
    assert_eq!(output_tokens_per_second(&ex), None);
    ex.llm.completion_tokens = None;
    ex.llm.eval_duration_ns = Some(S);
    assert_eq!(output_tokens_per_second(&ex), None);
    let mut zero_eval = chat(Role::Upstream, "m");
    zero_eval.llm.eval_duration_ns = Some(0);
    assert!(close(
        output_tokens_per_second(&zero_eval).unwrap(),
        100.0 / 1.5
    ));
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

    use crate::demo::scrape::Scrape;

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
