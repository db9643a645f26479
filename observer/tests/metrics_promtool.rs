//! The text exposition after a realistic mix of traffic passes `promtool check metrics` with no
//! lint complaint (docs/DESIGN.md#metrics-names-and-format). Skips with a message where promtool is
//! not installed, except in CI (`CI` set), where a missing promtool is a failure.

use std::{
    io::ErrorKind,
    process::{Command, Stdio},
};

use observer::base::{Direction, Role, Side};
use observer::{
    engine::{ConnMeta, Exchange, LlmFields, Method, Outcome, Timestamps},
    gpu::{GpuCollector, GpuProcess, GpuReading, GpuSnapshot},
    metrics::{EbpfEventKind, ExpositionFormat, Metrics, MetricsConfig, handles::Handles},
    probe::{
        Stage,
        check::ListedModel,
        metrics::ProbeMetrics,
        state::{CheckResult, Verdict},
    },
    procfs::{ProcessReading, TargetProcesses},
};

const MS: u64 = 1_000_000;

fn exchange(role: Role, method: Method, path: &str, status: Option<u16>) -> Exchange {
    let port = if role == Role::Gateway { 18789 } else { 11434 };
    let start = 5_000 * MS;
    Exchange {
        conn: ConnMeta {
            conn_id: 1,
            role,
            side: Side::Server,
            port,
            tgid: 100,
        },
        method,
        path: path.into(),
        status,
        ts: Timestamps {
            request_first: start,
            request_last: start + MS,
            response_first: status.map(|_| start + 40 * MS),
            first_chunk: None,
            response_last: status.map(|_| start + 900 * MS),
        },
        request_body_bytes: 180,
        response_body_bytes: 2_400,
        outcome: if status.is_some() {
            Outcome::Complete
        } else {
            Outcome::Aborted
        },
        exact: true,
        llm: LlmFields::default(),
        trace_id: None,
    }
}

fn generation(role: Role, path: &str, model: &str, reason: &str) -> Exchange {
    let mut ex = exchange(role, Method::Post, path, Some(200));
    ex.ts.first_chunk = Some(ex.ts.request_last + 350 * MS);
    ex.llm = LlmFields {
        model: Some(model.into()),
        stream: Some(true),
        done_reason: Some(reason.into()),
        prompt_tokens: Some(31),
        completion_tokens: Some(42),
        eval_duration_ns: Some(500 * MS),
        prompt_eval_duration_ns: Some(200 * MS),
        load_duration_ns: Some(1_200 * MS),
        total_duration_ns: Some(2_000 * MS),
        chunks: 43,
        last_chunk_ns: Some(ex.ts.request_last + 850 * MS),
        tool_calls: 1,
        ..LlmFields::default()
    };
    ex
}

fn observed_metrics() -> Metrics {
    let m = Metrics::new(MetricsConfig::default()).unwrap();
    for role in [Role::Gateway, Role::Upstream] {
        m.observe_exchange(&generation(role, "/api/chat", "llama3.2:3b", "stop"));
        m.observe_exchange(&generation(
            role,
            "/v1/chat/completions",
            "qwen3:8b",
            "length",
        ));
        m.observe_exchange(&exchange(role, Method::Get, "/api/tags?x=1", Some(200)));
        m.observe_exchange(&exchange(role, Method::Post, "/api/embed", Some(500)));
        m.observe_exchange(&exchange(role, Method::Other, "/wp-login.php", Some(404)));
        m.observe_exchange(&exchange(role, Method::Post, "/api/generate", None));
        let mut handles = Handles::default();
        handles.add_in_flight(role, 2);
        m.connection_opened(role);
        m.connection_closed(role);
        handles.add_connections_active(role, 4);
        m.publish(&mut handles);
        m.add_bytes(role, Direction::Ingress, 1_000);
        m.add_bytes(role, Direction::Egress, 20_000);
        m.add_parse_errors(role, "bad_request_line", 1);
    }
    let mut failed = generation(Role::Upstream, "/api/chat", "llama3.2:3b", "stop");
    failed.llm.error = true;
    m.observe_exchange(&failed);
    m.observe_gateway_overhead("/api/chat", 0.0031, Some(0.0007));
    m.observe_gateway_overhead("/api/chat", -0.0001, None);
    m.count_unmatched(Role::Gateway, 1);
    m.add_ebpf_events(EbpfEventKind::Data, 120);
    m.add_ebpf_events(EbpfEventKind::Open, 6);
    m.add_ebpf_lost("data", 0);
    observe_collectors(&m);
    m
}

/// The families the probe and the resource collectors add, with fixed readings.
fn observe_collectors(m: &Metrics) {
    let probe = ProbeMetrics::register(m, &["llama3.2:3b".to_string()]).unwrap();
    for (stage, ok) in [
        (Stage::Tcp, true),
        (Stage::Api, true),
        (Stage::Generate, false),
    ] {
        probe.record(
            "llama3.2:3b",
            stage,
            &CheckResult {
                ok,
                duration_s: 0.25,
                first_chunk_s: ok.then_some(0.2),
                error: String::new(),
            },
        );
    }
    probe.set_verdict("llama3.2:3b", Verdict::NotReady);
    probe.set_loaded(&[ListedModel {
        name: "llama3.2:3b".into(),
        model: "llama3.2:3b".into(),
        size: 3_000_000_000,
        size_vram: 2_900_000_000,
        context_length: Some(4096),
    }]);
    probe.set_version("0.32.15");

    let processes = TargetProcesses::new(m.prefix()).unwrap();
    m.register(Box::new(processes.clone())).unwrap();
    processes.update(vec![ProcessReading {
        pid: 4242,
        comm: "ollama".into(),
        role: Role::Upstream,
        cpu_seconds: 12.5,
        resident_bytes: 300_000_000,
        open_fds: 40,
        threads: 22,
    }]);

    let gpus = GpuCollector::new(m.prefix()).unwrap();
    m.register(Box::new(gpus.clone())).unwrap();
    let snapshot = GpuSnapshot {
        driver_version: "550.54.15".into(),
        gpus: vec![GpuReading {
            index: 0,
            uuid: "GPU-aaaa".into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_used_bytes: Some(40_000_000_000),
            memory_total_bytes: Some(85_520_809_984),
            utilization_ratio: Some(0.37),
            memory_utilization_ratio: Some(0.12),
            temperature_celsius: Some(54.0),
            power_watts: Some(312.25),
            processes: vec![GpuProcess {
                pid: 4242,
                memory_bytes: Some(38_000_000_000),
            }],
        }],
    };
    gpus.update(&snapshot, &|_| "ollama".into(), &|_| Some(Role::Upstream));
}

#[test]
fn text_exposition_passes_promtool_lint() {
    let (content_type, body) = observed_metrics().encode(ExpositionFormat::Text);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let text = String::from_utf8(body).unwrap();
    for family in [
        "observer_http_requests_total",
        "observer_http_request_duration_seconds",
        "gen_ai_server_time_to_first_token_seconds",
        "gen_ai_server_time_per_output_token_seconds",
        "gen_ai_client_token_usage",
        "observer_llm_request_phase_seconds",
        "observer_gateway_overhead_seconds",
        "observer_build_info",
        "observer_model_ready",
        "observer_probe_first_chunk_seconds",
        "observer_model_vram_bytes",
        "observer_upstream_info",
        "observer_target_process_cpu_seconds_total",
        "observer_gpu_memory_used_bytes",
        "observer_gpu_process_memory_bytes",
        "observer_gpu_info",
        "process_cpu_seconds_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing"
        );
    }

    let path = std::env::temp_dir().join(format!("observer-metrics-{}.prom", std::process::id()));
    std::fs::write(&path, &text).unwrap();
    let stdin = std::fs::File::open(&path).unwrap();
    let output = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::from(stdin))
        .output();
    std::fs::remove_file(&path).unwrap();
    let output = match output {
        Ok(output) => output,
        Err(err) if err.kind() == ErrorKind::NotFound => {
            if std::env::var_os("CI").is_some() {
                panic!("promtool is not installed (scripts/setup.sh installs it)");
            }
            eprintln!("SKIPPED text_exposition_passes_promtool_lint: promtool is not installed");
            return;
        }
        Err(err) => panic!("running promtool: {err}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
        "promtool check metrics: {}\nstdout:\n{stdout}\nstderr:\n{stderr}\nexposition:\n{text}",
        output.status
    );
}

#[test]
fn openmetrics_exposition_is_well_formed() {
    let (content_type, body) = observed_metrics().encode(ExpositionFormat::OpenMetrics);
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = String::from_utf8(body).unwrap();
    assert!(text.ends_with("# EOF\n"));
    let mut family = String::new();
    let mut kind = String::new();
    for line in text.lines().filter(|l| *l != "# EOF") {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, k) = rest.split_once(' ').unwrap();
            (family, kind) = (name.to_owned(), k.to_owned());
            if kind == "counter" {
                assert!(!family.ends_with("_total"), "{line}");
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            assert!(rest.starts_with(&format!("{family} ")), "{line}");
            continue;
        }
        // Every sample belongs to the family declared above it, with the type's suffixes.
        let name = line.split(['{', ' ']).next().unwrap();
        let suffix = name.strip_prefix(family.as_str()).unwrap_or_else(|| {
            panic!("sample {line:?} outside its family {family}");
        });
        let allowed: &[&str] = match kind.as_str() {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_count", "_sum"],
            _ => &[""],
        };
        assert!(allowed.contains(&suffix), "{line} in a {kind}");
    }
}
