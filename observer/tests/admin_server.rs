//! The admin server over real sockets: routes, status codes, the bearer token on `/metrics`,
//! content negotiation, readiness flips and the `/status` document. Requests are written by
//! hand and their responses read by testkit's client, so the test sees what a scraper or probe
//! would.

use std::{net::SocketAddr, sync::Arc};

use observer::base::Role;
use observer::{
    admin::{AdminConfig, StatusBoard, serve},
    metrics::{Metrics, MetricsConfig},
};
use testkit::http::{Conn, Ending};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

struct Reply {
    status: u16,
    reply: testkit::http::Reply,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.reply.header(name).unwrap_or("")
    }
}

/// One HTTP/1.1 request on a fresh connection, its response read by testkit's client.
async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut conn = Conn::connect(addr).await;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("Content-Length: 0\r\n\r\n");
    conn.send(head.as_bytes()).await;
    let reply = conn.reply().await;
    // Connection: close: a body without a length ends with the connection.
    assert!(
        matches!(reply.ending, Ending::Complete | Ending::Eof),
        "{path}: {:?} {}",
        reply.ending,
        reply.head
    );
    assert_eq!(reply.header("transfer-encoding"), None, "{path}");
    if let Some(length) = reply.header("content-length") {
        assert_eq!(length.parse::<usize>().unwrap(), reply.body.len(), "{path}");
    }
    let status = reply
        .head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{path}: no status in {}", reply.head));
    Reply {
        status,
        body: reply.text(),
        reply,
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[]).await
}

struct Server {
    addr: SocketAddr,
    status: Arc<StatusBoard>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start(token: Option<&str>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new(MetricsConfig::default()).unwrap());
    metrics.add_ebpf_events(observer::metrics::EbpfEventKind::Data, 3);
    let status = Arc::new(StatusBoard::new(
        "ebpf",
        vec![(18789, Role::Gateway), (11434, Role::Upstream)],
    ));
    let (stop, stopped) = oneshot::channel::<()>();
    let config = AdminConfig {
        token: token.map(str::to_owned),
    };
    let task = tokio::spawn(serve(listener, metrics, status.clone(), config, async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        status,
        stop,
        task,
    }
}

impl Server {
    async fn shut_down(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn routes_and_errors() {
    let server = start(None).await;
    let addr = server.addr;

    let health = get(addr, "/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    assert_eq!(health.header("content-type"), "text/plain; charset=utf-8");

    for path in ["/", "/nope", "/metrics/", "/healthz/extra"] {
        let missing = get(addr, path).await;
        assert_eq!(
            (missing.status, missing.body.as_str()),
            (404, "not found\n"),
            "{path}"
        );
        assert!(missing.header("content-type").starts_with("text/plain"));
    }

    for path in ["/metrics", "/healthz", "/readyz", "/status"] {
        let wrong = request(addr, "POST", path, &[]).await;
        assert_eq!(wrong.status, 405, "{path}");
        assert!(wrong.header("allow").contains("GET"), "{path}");
    }

    // Without a token configured, /metrics is open.
    let metrics = get(addr, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.header("content-type"),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(
        metrics
            .body
            .contains("observer_ebpf_events_total{kind=\"data\"} 3\n")
    );
    assert!(metrics.body.contains("observer_build_info{mode=\"ebpf\""));

    server.shut_down().await;
}

#[tokio::test]
async fn metrics_token_and_negotiation() {
    let server = start(Some("s3cret")).await;
    let addr = server.addr;

    let anonymous = get(addr, "/metrics").await;
    assert_eq!(anonymous.status, 401);
    assert!(anonymous.header("www-authenticate").starts_with("Bearer"));
    assert!(!anonymous.body.contains("observer_"));

    for wrong in ["Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"] {
        let reply = request(addr, "GET", "/metrics", &[("Authorization", wrong)]).await;
        assert_eq!(reply.status, 401, "{wrong}");
    }

    let auth = ("Authorization", "Bearer s3cret");
    let text = request(addr, "GET", "/metrics", &[auth]).await;
    assert_eq!(text.status, 200);
    assert!(
        text.header("content-type")
            .starts_with("text/plain; version=0.0.4")
    );
    assert!(
        text.body
            .contains("# TYPE observer_ebpf_events_total counter\n")
    );

    let accept = (
        "Accept",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    );
    let om = request(addr, "GET", "/metrics", &[auth, accept]).await;
    assert_eq!(om.status, 200);
    assert_eq!(
        om.header("content-type"),
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(om.body.contains("# TYPE observer_ebpf_events counter\n"));
    assert!(om.body.ends_with("# EOF\n"));

    // Only /metrics is behind the token.
    assert_eq!(get(addr, "/healthz").await.status, 200);
    assert_eq!(get(addr, "/status").await.status, 200);
    assert_eq!(get(addr, "/readyz").await.status, 503);

    server.shut_down().await;
}

#[tokio::test]
async fn readiness_flips_with_the_pipeline() {
    let server = start(None).await;
    let addr = server.addr;

    let not_yet = get(addr, "/readyz").await;
    assert_eq!(not_yet.status, 503);
    assert_eq!(not_yet.body, "not ready: the pipeline is not running\n");

    server.status.set_ready(true);
    let no_programs = get(addr, "/readyz").await;
    assert_eq!(no_programs.status, 503);
    assert_eq!(
        no_programs.body,
        "not ready: no kernel programs are attached\n"
    );

    server.status.set_programs_attached(12);
    let ready = get(addr, "/readyz").await;
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));

    server.status.set_not_ready("ring buffer reader stopped");
    let stopped = get(addr, "/readyz").await;
    assert_eq!(stopped.status, 503);
    assert_eq!(stopped.body, "not ready: ring buffer reader stopped\n");

    server.shut_down().await;
}

#[tokio::test]
async fn status_document() {
    let before_start = std::time::Instant::now();
    let server = start(Some("s3cret")).await;
    let addr = server.addr;
    server.status.set_programs_attached(12);
    server.status.set_ready(true);
    server.status.add_events(40);
    server.status.add_exchanges(9);
    server.status.set_connections_open(2);

    let reply = get(addr, "/status").await;
    let since_start = before_start.elapsed().as_secs_f64();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), "application/json");
    let doc: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(doc["mode"], "ebpf");
    assert_eq!(doc["ready"], true);
    assert_eq!(doc["not_ready_reason"], serde_json::Value::Null);
    assert_eq!(doc["programs_attached"], 12);
    assert_eq!(doc["events"], 40);
    assert_eq!(doc["exchanges"], 9);
    assert_eq!(doc["connections_open"], 2);
    assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        doc["watched_ports"],
        serde_json::json!([
            {"port": 18789, "role": "gateway"},
            {"port": 11434, "role": "upstream"},
        ])
    );
    // The server started after `before_start` and answered before `since_start` was read.
    let uptime = doc["uptime_seconds"].as_f64().unwrap();
    assert!(
        (0.0..=since_start).contains(&uptime),
        "uptime {uptime} s, {since_start} s since the test started the server"
    );
    // It grows: asked again until it reads more (the deadline only bounds a failure), and
    // never more than the time since the test started the server.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let again: serde_json::Value =
            serde_json::from_str(&get(addr, "/status").await.body).unwrap();
        let later = again["uptime_seconds"].as_f64().unwrap();
        assert!(
            later <= before_start.elapsed().as_secs_f64(),
            "uptime {later} s"
        );
        if later > uptime {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "uptime still {later} s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    assert!(!reply.body.contains("s3cret"));

    server.shut_down().await;
}

/// `/ready/model` follows a real probe of an in-process simulator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_model_answers_from_the_probe() {
    use clap::Parser;
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        probe: observer::probe::DaemonProbeArgs,
    }

    let server = start(None).await;
    let reply = get(server.addr, "/ready/model").await;
    assert_eq!(reply.status, 404);
    assert!(
        reply.body.contains("the readiness probe is off"),
        "{}",
        reply.body
    );

    let sim_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = observer_sim::SimConfig::default();
    config.timing.load = std::time::Duration::from_millis(5);
    config.timing.first_token = std::time::Duration::from_millis(5);
    let sim = observer_sim::spawn(sim_listener, config).unwrap();
    let upstream = sim.local_addr().to_string();
    let flags = Flags::parse_from([
        "run",
        "--upstream",
        &upstream,
        "--model",
        "llama3.2:1b",
        "--probe-tcp-interval",
        "50ms",
        "--probe-api-interval",
        "50ms",
        "--probe-generate-interval",
        "50ms",
        "--probe-first-chunk-timeout",
        "200ms",
        "--probe-failures",
        "1",
    ]);
    let metrics = Metrics::new(MetricsConfig::default()).unwrap();
    let prober = observer::probe::spawn(&flags.probe, &metrics, Default::default()).unwrap();
    server
        .status
        .attach_probe(prober.readiness(), prober.upstream().to_owned());

    let wait_for = |path: &'static str, status: u16| async move {
        for _ in 0..200 {
            let reply = get(server.addr, path).await;
            if reply.status == status {
                return reply;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("{path} never answered {status}");
    };
    let reply = wait_for("/ready/model", 200).await;
    assert_eq!(reply.header("content-type"), "application/json");
    let doc: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(doc["ready"], true);
    assert_eq!(doc["upstream"], upstream);
    assert_eq!(doc["models"][0]["model"], "llama3.2:1b");
    assert_eq!(doc["models"][0]["verdict"], "ready");
    assert_eq!(
        get(server.addr, "/ready/model/llama3.2:1b").await.status,
        200
    );
    let other = get(server.addr, "/ready/model/qwen3:0.6b").await;
    assert_eq!(other.status, 404);
    assert!(other.body.contains("is not probed"), "{}", other.body);
    let status = get(server.addr, "/status").await;
    assert!(
        status
            .body
            .contains(r#""models":[{"model":"llama3.2:1b","verdict":"ready"}]"#),
        "{}",
        status.body
    );

    sim.control().stall();
    let reply = wait_for("/ready/model/llama3.2:1b", 503).await;
    let doc: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(doc["ready"], false);
    assert_eq!(doc["models"][0]["verdict"], "not_ready");
    drop(prober);
    sim.shutdown().await.unwrap();
    server.shut_down().await;
}
